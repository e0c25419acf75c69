"""Key material made fresh for each run: a self-signed TLS certificate, and an
RS256 signing key with its JWKS file and a token for the policy scenario."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

JWT_ISSUER = "https://idp.bench.local"
JWT_AUDIENCE = "bench"
JWT_KID = "bench-1"
JWT_TENANT = "t1"


@dataclass
class TlsFiles:
    cert: Path
    key: Path
    combined: Path  # cert + key in one PEM, as haproxy wants


@dataclass
class JwtFiles:
    jwks: Path
    token: str


def make_tls(workdir: Path) -> TlsFiles:
    """ECDSA P-256 self-signed certificate for 127.0.0.1 / localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = TlsFiles(workdir / "tls.pem", workdir / "tls.key", workdir / "tls-combined.pem")
    files.cert.write_bytes(cert_pem)
    files.key.write_bytes(key_pem)
    files.combined.write_bytes(cert_pem + key_pem)
    for path in (files.key, files.combined):
        path.chmod(0o600)
    return files


def make_jwt(workdir: Path) -> JwtFiles:
    """RSA key → JWKS file (public part) and one long-lived RS256 token."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid=JWT_KID, alg="RS256", use="sig")
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    now = int(time.time())
    claims = {
        "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "alice@example.com",
        "iat": now, "nbf": now - 60, "exp": now + 6 * 3600,
        "groups": ["eng", "agents"], "tenant_id": JWT_TENANT,
    }
    token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": JWT_KID})
    return JwtFiles(jwks, token)
