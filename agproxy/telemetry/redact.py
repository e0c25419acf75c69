"""Secrets never leave the process: /config and logs show them redacted."""

from __future__ import annotations

from typing import Any

SECRET_WORDS = ("secret", "password", "api_key", "private_key", "credential", "session_token", "access_key")
REDACTED = "<redacted>"


def is_secret_key(key: str) -> bool:
    k = key.lower()
    if k.endswith("_env") or k.endswith("_file"):
        return False   # the name of a variable or a file is not the secret itself
    return any(w in k for w in SECRET_WORDS)


def redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if key and is_secret_key(key) and isinstance(value, (str, bytes)):
        return REDACTED
    return value
