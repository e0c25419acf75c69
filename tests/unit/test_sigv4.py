"""SigV4 signing (agproxy.identity.aws) against botocore's own reference signing."""

from __future__ import annotations

import datetime as dt
from urllib.parse import quote

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from agproxy.identity.aws import AwsCredentials, NoCredentials, SigV4Signer, host_from_url, verify_sigv4

AK, SK = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
ARN = "arn:aws:bedrock-agentcore:us-east-1:111122223333:runtime/support-a1B2c3"
URL = f"https://bedrock-agentcore.us-east-1.amazonaws.com/runtimes/{quote(ARN, safe='')}/invocations?qualifier=DEFAULT"
NOW = dt.datetime(2026, 11, 28, 12, 0, 0, tzinfo=dt.timezone.utc)


def signer(token: str | None = None) -> SigV4Signer:
    c = AwsCredentials()
    c.set_static(AK, SK, token)
    return SigV4Signer(c, "bedrock-agentcore", "us-east-1")


def headers() -> list[tuple[str, str]]:
    return [("host", "bedrock-agentcore.us-east-1.amazonaws.com"), ("content-type", "application/json"),
            ("x-amzn-bedrock-agentcore-runtime-session-id", "s" * 40)]


def reference(body: bytes, token: str | None = None) -> str:
    """What plain botocore produces for the same request."""
    req = AWSRequest(method="POST", url=URL, data=body, headers=dict(headers()))
    auth = SigV4Auth(Credentials(AK, SK, token), "bedrock-agentcore", "us-east-1")
    req.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth._modify_request_before_signing(req)
    cr = auth.canonical_request(req)
    sig = auth.signature(auth.string_to_sign(req, cr), req)
    auth._inject_signature_to_request(req, sig)
    return req.headers["Authorization"]


def test_matches_botocore_reference():
    body = b'{"prompt": "hi"}'
    out = dict(signer().sign("POST", URL, headers(), body, now=NOW))
    assert out["authorization"] == reference(body)
    assert out["x-amz-date"] == "20261128T120000Z"
    assert "SignedHeaders=content-type;host;x-amz-date;x-amzn-bedrock-agentcore-runtime-session-id" \
        in out["authorization"]


def test_session_token_is_signed():
    out = dict(signer("tok123").sign("POST", URL, headers(), b"x", now=NOW))
    assert out["x-amz-security-token"] == "tok123"
    assert "x-amz-security-token" in out["authorization"]
    assert out["authorization"] == reference(b"x", "tok123")


def test_canonical_path_double_encodes_the_arn():
    s = signer()
    req = AWSRequest(method="POST", url=URL)
    from agproxy.identity.aws import _Auth
    auth = _Auth(s.credentials.frozen(), "bedrock-agentcore", "us-east-1")
    req.context["timestamp"] = "20261128T120000Z"
    req.context["payload_sha256"] = "0" * 64
    cr = auth.canonical_request(req)
    assert cr.splitlines()[1] == "/runtimes/" + quote(quote(ARN, safe=""), safe="/~") + "/invocations"
    assert "%253A" in cr.splitlines()[1] and "%252F" in cr.splitlines()[1]


def _signed(body=b'{"a":1}'):
    h = headers()
    h += signer().sign("POST", URL, h, body, now=NOW)
    return h, body


def test_verify_accepts_and_rejects():
    h, body = _signed()
    ok = verify_sigv4("POST", URL, h, body, {AK: SK}, "bedrock-agentcore", now=NOW)
    assert ok is None
    assert "does not match" in verify_sigv4("POST", URL, h, body + b" ", {AK: SK}, "bedrock-agentcore", now=NOW)
    tampered = [(k, "x" * 40 if k.endswith("session-id") else v) for k, v in h]
    assert "does not match" in verify_sigv4("POST", URL, tampered, body, {AK: SK}, "bedrock-agentcore", now=NOW)
    # unsigned extra header: allowed (AWS only checks the signed ones)
    assert verify_sigv4("POST", URL, h + [("x-extra", "1")], body, {AK: SK}, "bedrock-agentcore", now=NOW) is None
    assert "unknown access key" in verify_sigv4("POST", URL, h, body, {"OTHER": SK}, "bedrock-agentcore", now=NOW)
    later = NOW + dt.timedelta(minutes=10)
    assert "expired" in verify_sigv4("POST", URL, h, body, {AK: SK}, "bedrock-agentcore", now=later)
    decoded = URL.replace("%3A", ":")
    assert verify_sigv4("POST", decoded, h, body, {AK: SK}, "bedrock-agentcore", now=NOW) is not None


def test_trace_headers_are_not_signed():
    h = headers() + [("traceparent", "00-" + "a" * 32 + "-" + "b" * 16 + "-01")]
    auth = dict(signer().sign("POST", URL, h, b"", now=NOW))["authorization"]
    assert "traceparent" not in auth


def test_host_from_url():
    assert host_from_url("https://bedrock-agentcore.us-east-1.amazonaws.com/x") == \
        "bedrock-agentcore.us-east-1.amazonaws.com"
    assert host_from_url("http://127.0.0.1:9400/x") == "127.0.0.1:9400"
    assert host_from_url("http://127.0.0.1:80/x") == "127.0.0.1"


def test_no_credentials():
    c = AwsCredentials()
    with pytest.raises(NoCredentials):
        SigV4Signer(c, "bedrock-agentcore", "us-east-1").sign("POST", URL, headers(), b"")
    assert c.readiness()


def test_resolve_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AK)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SK)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    c = AwsCredentials()
    c.resolve_blocking()
    assert c.readiness() is None
    assert c.frozen().access_key == AK
    assert SK not in repr(c.describe())
