"""Validated reading of TOML tables, with every problem reported by TOML path.

Theory of operation: a `Section` wraps one TOML table and the path that leads to it
(`route[2].jwt`). Readers (`sec.str("issuer")`, `sec.duration("timeout", "5s")`, ...)
return typed values and record a problem instead of raising, so that one load
reports *all* mistakes at once. `sec.done()` reports the keys nobody asked for
(unknown keys are errors: a typo must not silently disable a policy). Each policy
and backend module validates its own section with these readers; this module is
the only place that knows how TOML values are checked. `Problems.raise_if_any()`
turns the collected list into one `ConfigError`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

T = TypeVar("T")

_REQUIRED = object()
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(Exception):
    """A configuration that cannot be used; `problems` lists each by TOML path."""

    def __init__(self, problems: list[str]):
        from agproxy.telemetry.redact import redact_text
        # Messages may quote a value (`unsupported URL scheme in 'ftp://u:pw@h'`) and are
        # printed by `validate` and logged on a rejected reload: no secret in them.
        self.problems = [redact_text(p) for p in problems]
        super().__init__("\n".join(self.problems))


def parse_duration(text: str) -> float:
    """'250ms' → 0.25, '5s' → 5.0, '10m' → 600.0; raises ValueError."""
    m = _DURATION.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"invalid duration {text!r} (expected e.g. \"250ms\", \"5s\", \"10m\")")
    return float(m.group(1)) * _UNITS[m.group(2)]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


@dataclass
class Problems:
    items: list[str] = field(default_factory=list)

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(list(self.items))

    def __bool__(self) -> bool:
        return bool(self.items)


class Section:
    """One TOML table under validation."""

    __slots__ = ("path", "data", "problems", "_seen")

    def __init__(self, path: str, data: Any, problems: Problems):
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()
        if not isinstance(data, dict):
            problems.add(path, f"expected a table, got {type(data).__name__}")
            data = {}
        self.data = data

    # -- plumbing -------------------------------------------------------------
    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> None:
        self.problems.add(self.sub(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> list[str]:
        return list(self.data)

    def _get(self, key: str, default: Any, kind: type | tuple, kind_name: str) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.error(key, "required")
                return None
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind is not bool and kind != (bool,):
            self.error(key, f"expected {kind_name}, got a boolean")
            return None if default is _REQUIRED else default
        if not isinstance(value, kind):
            self.error(key, f"expected {kind_name}, got {_type_name(value)}")
            return None if default is _REQUIRED else default
        return value

    # -- typed readers ----------------------------------------------------------
    def str(self, key: str, default: Any = _REQUIRED, choices: Iterable[str] | None = None) -> Any:
        value = self._get(key, default, str, "a string")
        if choices is not None and isinstance(value, str) and key in self.data:
            choices = list(choices)
            if value not in choices:
                self.error(key, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
                return None if default is _REQUIRED else default
        return value

    def int(self, key: str, default: Any = _REQUIRED, min: int | None = None, max: int | None = None) -> Any:
        value = self._get(key, default, int, "an integer")
        if isinstance(value, int) and key in self.data:
            if min is not None and value < min:
                self.error(key, f"must be >= {min}, got {value}")
            if max is not None and value > max:
                self.error(key, f"must be <= {max}, got {value}")
        return value

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, (int, float), "a number")
        return float(value) if isinstance(value, (int, float)) else value

    def bool(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._get(key, default, bool, "true or false")

    def duration(self, key: str, default: Any = _REQUIRED) -> Any:
        """A duration string; the default may be a string or already seconds."""
        value = self._get(key, default, str, 'a duration string such as "5s"')
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return None

    def str_list(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, list, "a list of strings")
        if isinstance(value, list) and key in self.data:
            for i, item in enumerate(value):
                if not isinstance(item, str):
                    self.problems.add(f"{self.sub(key)}[{i}]", f"expected a string, got {_type_name(item)}")
                    return None if default is _REQUIRED else default
        return value

    def str_map(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._get(key, default, dict, "a table of strings")
        if isinstance(value, dict) and key in self.data:
            for k, v in value.items():
                if not isinstance(v, str):
                    self.problems.add(f"{self.sub(key)}.{k}", f"expected a string, got {_type_name(v)}")
                    return None if default is _REQUIRED else default
        return value

    def raw(self, key: str, default: Any = _REQUIRED) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.error(key, "required")
                return None
            return default
        return self.data[key]

    def section(self, key: str, required: bool = False) -> "Section | None":
        """A sub-table, or None when absent (an error when required)."""
        self._seen.add(key)
        if key not in self.data:
            if required:
                self.error(key, "required")
            return None
        return Section(self.sub(key), self.data[key], self.problems)

    def sections(self, key: str) -> list["Section"]:
        """An array of tables (`[[route]]`)."""
        self._seen.add(key)
        value = self.data.get(key, [])
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.error(key, f"expected an array of tables, got {_type_name(value)}")
            return []
        return [Section(f"{self.sub(key)}[{i}]", item, self.problems) for i, item in enumerate(value)]

    def check(self, key: str, ok: bool, message: str) -> bool:
        if not ok:
            self.error(key, message)
        return ok

    def convert(self, key: str, value: Any, fn: Callable[[Any], T]) -> T | None:
        """Run fn(value); a raised exception becomes a problem at this key."""
        try:
            return fn(value)
        except Exception as exc:  # the message is the user's diagnosis
            self.error(key, str(exc) or type(exc).__name__)
            return None

    def done(self, allowed_extra: Iterable[str] = ()) -> None:
        """Report every key that no reader asked for."""
        known = self._seen | set(allowed_extra)
        for key in self.data:
            if key not in known:
                self.error(key, "unknown key" + did_you_mean(key, known))


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return type(value).__name__
