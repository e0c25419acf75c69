"""The OpenTelemetry resource: who is producing this telemetry.

Theory of operation: `resource_attributes(environ)` builds the attributes once per
process, in the order the specification gives precedence (later wins):

1. what agproxy itself knows: `service.name = agproxy`, `service.version`, and
   `telemetry.sdk.*` (agproxy encodes its spans itself, telemetry/otlp.py, so the
   "SDK" is agproxy: name `agproxy`, its version, language `python`);
2. `OTEL_RESOURCE_ATTRIBUTES`: `key=value` pairs separated by commas, keys and values
   percent-decoded (`,` and `=` inside them must be encoded), surrounding whitespace
   trimmed. Any malformed pair (no `=`, an empty key, a `%` not followed by two hex
   digits, bytes that are not UTF-8) discards the whole variable, with one warning;
3. `OTEL_SERVICE_NAME`, which wins over a `service.name` inside the attributes.

The same attributes go on every exported span (telemetry/tracing.py) and, as labels of
one `target_info` info metric, on /metrics (telemetry/metrics.py), as the
Prometheus/OpenMetrics compatibility rules for OTel resources say. Label names there are
sanitised: characters outside `[a-zA-Z0-9_]` become `_`, a leading digit gets a `key_`
prefix, a leading `__` (reserved by Prometheus) a `key` prefix, and keys that collide
after sanitising have their values joined with `;`, ordered by original key.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping
from urllib.parse import unquote_to_bytes

from agproxy import __version__

log = logging.getLogger("agproxy.telemetry")

DEFAULT_SERVICE_NAME = "agproxy"

_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


class MalformedAttributes(ValueError):
    pass


def _decode(text: str) -> str:
    if _BAD_PERCENT.search(text):
        raise MalformedAttributes(f"bad percent-encoding in {text!r}")
    try:
        return unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedAttributes(f"{text!r} does not decode to UTF-8") from None


def parse_resource_attributes(value: str) -> dict[str, str]:
    """`OTEL_RESOURCE_ATTRIBUTES` → attributes; MalformedAttributes if any pair is bad."""
    out: dict[str, str] = {}
    for member in value.split(","):
        if not member.strip():
            continue     # "a=1," or ", ,": an empty list member carries nothing
        key, sep, val = member.partition("=")
        if not sep:
            raise MalformedAttributes(f"{member.strip()!r} is not key=value")
        key = _decode(key.strip())
        if not key:
            raise MalformedAttributes(f"{member.strip()!r} has an empty key")
        out[key] = _decode(val.strip())
    return out


def resource_attributes(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process's resource attributes (see the module docstring for precedence)."""
    env = os.environ if environ is None else environ
    attrs = {
        "service.name": DEFAULT_SERVICE_NAME,
        "service.version": __version__,
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "agproxy",
        "telemetry.sdk.version": __version__,
    }
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if raw.strip():
        try:
            attrs.update(parse_resource_attributes(raw))
        except MalformedAttributes as exc:
            log.warning("OTEL_RESOURCE_ATTRIBUTES ignored: %s", exc)
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        attrs["service.name"] = name
    return attrs


_process: dict[str, str] | None = None


def process_resource() -> dict[str, str]:
    """`resource_attributes()` of this process, computed (and warned about) once; a forked
    worker inherits the parent's."""
    global _process
    if _process is None:
        _process = resource_attributes()
    return _process


def label_name(key: str) -> str:
    """A resource attribute key as a Prometheus label name."""
    name = _LABEL_BAD.sub("_", key)
    if name[:1].isdigit():
        name = "key_" + name
    elif name.startswith("__"):
        name = "key" + name
    return name


def target_info_labels(attrs: Mapping[str, str]) -> dict[str, str]:
    """Resource attributes as `target_info` labels (sanitised names, collisions joined)."""
    grouped: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(attrs):
        grouped.setdefault(label_name(key), []).append((key, str(attrs[key])))
    return {name: ";".join(v for _, v in pairs) for name, pairs in grouped.items()}
