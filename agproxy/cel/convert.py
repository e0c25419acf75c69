"""Library values to agproxy's plain values, and CEL's text forms (string())."""

from __future__ import annotations

import datetime

from agproxy.cel import environment

def _type_name(value) -> str:
    """The CEL type name of a library plain value (for messages)."""
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "double", str: "string", bytearray: "bytes",
            list: "list", dict: "map"}.get(type(value), type(value).__name__)


def _format_timestamp(value: datetime.datetime) -> str:
    """CEL's string(timestamp): RFC 3339 in UTC, fraction only when non-zero."""
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    return text + _fraction(value.microsecond) + "Z"


def _format_duration(value: datetime.timedelta) -> str:
    """CEL's string(duration): seconds, fraction only when non-zero ("1.500s")."""
    micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    seconds, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{seconds}{_fraction(fraction)}s"


def _fraction(micros: int) -> str:
    """".500" / ".000250" / "": digits in groups of three, as cel-cpp prints them."""
    if not micros:
        return ""
    if micros % 1000 == 0:
        return ".%03d" % (micros // 1000)
    return ".%06d" % micros


def _to_plain(value):
    """Library plain values -> agproxy's plain values (bytes not bytearray, type names)."""
    t = type(value)
    if t is list:
        return [_to_plain(v) for v in value]
    if t is dict:
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    if t is bytearray:
        return bytes(value)
    lib = environment.library.cel
    if lib is not None and t is lib.Type:
        return value.name().lower()
    return value
