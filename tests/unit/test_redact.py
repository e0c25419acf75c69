"""telemetry/redact.py: secrets redacted by key and by shape; everything else kept."""

from __future__ import annotations

import pytest

from agproxy.telemetry.redact import REDACTED, redact, redact_text


@pytest.mark.parametrize("text,expected", [
    ("Bearer sk-live-abcdefghijklmnop", f"Bearer {REDACTED}"),
    ('"bearer abcdefgh12345678"', f'"bearer {REDACTED}"'),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", f"Authorization: Basic {REDACTED}"),
    ("https://user:pw@host:8443/p", f"https://{REDACTED}@host:8443/p"),
    ("redis://:s3cret@127.0.0.1:6379", f"redis://{REDACTED}@127.0.0.1:6379"),
    ("https://h/x?api_key=abc&keep=1", f"https://h/x?api_key={REDACTED}&keep=1"),
    ("https://h/x?X-Amz-Signature=abcd&X-Amz-Credential=AK%2F1", f"https://h/x?X-Amz-Signature={REDACTED}"
                                                                 f"&X-Amz-Credential={REDACTED}"),
    ("token eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2ln here", f"token {REDACTED} here"),
    ('"sk-ant-api03-abcdefghijklmnopqrstuv"', f'"{REDACTED}"'),
    ("AKIAIOSFODNN7EXAMPLE", REDACTED),
    ("ghp_" + "a" * 36, REDACTED),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", REDACTED),
])
def test_credentials_are_redacted_by_shape(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("text", [
    '"Bearer " + jwt.sub', "jwt.sub", "Bearer ", "missing bearer token", "https://idp.example.com/jwks.json",
    "http://127.0.0.1:9000/base", 'request.headers["x-api-key"] != ""', "risk-assessment-service-v2",
    "arn:aws:bedrock-agentcore:us-east-1:111122223333:runtime/support-a1B2c3",
])
def test_ordinary_values_are_kept(text):
    assert redact_text(text) == text


def test_redact_by_key_and_header_tables():
    cfg = {
        "backend": {"b": {"headers": {"authorization": "x", "X-Api-Key": "y", "token": "z",
                                       "accept": "text/plain"},
                          "client_secret": "s", "client_secret_env": "AGENT_SECRET",
                          "key_file": "k.pem", "password": "", "api_key": "k"}},
        "route": [{"rate_limit": {"local": [{"key": "jwt.sub"}]}, "forward_token": {"token": "subject"},
                   "transform": {"request": {"set": {"cookie": '"a=b"', "x-user": "jwt.sub"}}}}],
        "pairs": {"headers": [["authorization", "Bearer abc"], ["x-team", "cx"]]},
    }
    out = redact(cfg)
    b = out["backend"]["b"]
    assert b["headers"] == {"authorization": REDACTED, "X-Api-Key": REDACTED, "token": REDACTED,
                            "accept": "text/plain"}
    assert b["client_secret"] == REDACTED and b["api_key"] == REDACTED
    assert b["client_secret_env"] == "AGENT_SECRET" and b["key_file"] == "k.pem" and b["password"] == ""
    r = out["route"][0]
    assert r["rate_limit"]["local"][0]["key"] == "jwt.sub"
    assert r["forward_token"]["token"] == "subject"
    assert r["transform"]["request"]["set"] == {"cookie": REDACTED, "x-user": "jwt.sub"}
    assert out["pairs"]["headers"] == [["authorization", REDACTED], ["x-team", "cx"]]
    assert cfg["backend"]["b"]["headers"]["authorization"] == "x"     # a copy; the input is untouched
