"""JWT verification, JWK parsing, the verified-token cache and the JWKS sources.

The remote parts talk to a real identity provider (tests/support/idp.py: an HTTP
server on 127.0.0.1) through agproxy.upstream.fetch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import jwt as pyjwt
import pytest

from agproxy.identity.jwks import (JwksError, KeySet, RemoteKeySource, cache_lifetime, parse_jwk,
                                   parse_jwks)
from agproxy.identity.jwt_verify import (JwtError, TokenCache, UnknownKeyError, Verifier,
                                         peek_claims)
from agproxy.identity.providers import JwtProvider, ProviderGroup, static_provider
from agproxy.http.messages import Headers
from tests.support.idp import IdP, SigningKey, b64url, hs256_with_public_key, unsigned_token, with_header

ALL_KINDS = ("RSA", "EC", "EC384", "Ed25519")


@pytest.fixture(scope="module")
def idp():
    server = IdP(key_kinds=ALL_KINDS)
    yield server
    server.close()


def verifier(idp, **kw):
    kw.setdefault("issuer", idp.issuer)
    kw.setdefault("audiences", ["agents"])
    kw.setdefault("leeway", 30)
    return Verifier(**kw)


def keyset(idp, with_alg=True):
    return parse_jwks({"keys": [k.jwk(with_alg) for k in idp.keys]})


# ---------------------------------------------------------------------------------
# JWK parsing
# ---------------------------------------------------------------------------------

def test_parse_every_key_type(idp):
    ks = keyset(idp)
    assert len(ks) == 4
    families = sorted(k.family for k in ks.keys)
    assert families == ["EC:P-256", "EC:P-384", "OKP", "RSA"]
    assert ks.kids == sorted(k.kid for k in idp.keys)


def test_symmetric_encryption_and_foreign_keys_are_skipped(idp):
    rsa = idp.keys[0].jwk()
    doc = {"keys": [
        {"kty": "oct", "k": b64url(b"secret"), "kid": "hmac"},
        dict(rsa, kid="enc", use="enc"),
        dict(rsa, kid="wrap", key_ops=["wrapKey"]),
        dict(rsa, kid="oaep", alg="RSA-OAEP"),
        dict(rsa, kid="hs", alg="HS256"),
        {"kty": "OKP", "crv": "X25519", "x": b64url(b"\x01" * 32), "kid": "x"},
        {"kty": "weird", "kid": "w"},
        rsa,
    ]}
    ks = parse_jwks(doc)
    assert ks.kids == [idp.keys[0].kid]


def test_no_usable_key_is_an_error():
    with pytest.raises(JwksError, match="no usable"):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})
    with pytest.raises(JwksError, match="invalid JSON"):
        parse_jwks("{nope")
    with pytest.raises(JwksError, match="keys"):
        parse_jwks({"nokeys": []})


def test_short_rsa_and_off_curve_points_are_refused():
    from cryptography.hazmat.primitives.asymmetric import rsa
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    jwk = {"kty": "RSA", "kid": "small", "n": b64url(small.n.to_bytes(128, "big")), "e": "AQAB"}
    with pytest.raises(ValueError, match="too short"):
        parse_jwk(jwk)
    bad_point = {"kty": "EC", "crv": "P-256", "x": b64url(b"\x01" * 32), "y": b64url(b"\x02" * 32)}
    with pytest.raises(ValueError):
        parse_jwk(bad_point)
    # the set survives one broken key and reports it
    ks = parse_jwks({"keys": [jwk, SigningKey("EC").jwk()]})
    assert len(ks) == 1 and "too short" in ks.skipped[0]


def test_jwk_alg_must_fit_the_key(idp):
    rsa = idp.keys[0].jwk(with_alg=False)
    with pytest.raises(ValueError, match="does not fit"):
        parse_jwk(dict(rsa, alg="ES256"))


def test_x5c_only_key():
    import datetime as dt
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    k = SigningKey("RSA")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public)
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(k.private, hashes.SHA256()))
    jwk = {"kty": "RSA", "kid": k.kid, "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]}
    key = parse_jwk(jwk)
    assert key.family == "RSA" and key.thumbprint == parse_jwk(k.jwk(False)).thumbprint


def test_thumbprint_matches_rfc7638_example():
    # RFC 7638 §3.1
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
                "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
                "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcR"
                "wr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}
    assert parse_jwk(jwk).thumbprint == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


# ---------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,alg", [
    ("RSA", "RS256"), ("RSA", "RS384"), ("RSA", "RS512"), ("RSA", "PS256"), ("RSA", "PS384"),
    ("RSA", "PS512"), ("EC", "ES256"), ("EC384", "ES384"), ("Ed25519", "EdDSA"),
])
def test_every_algorithm_verifies(idp, kind, alg):
    key = next(k for k in idp.keys if k.kind == kind)
    token = idp.mint(key=key, alg=alg)
    claims, deadline = verifier(idp).verify(token, keyset(idp, with_alg=False))
    assert claims["sub"] == "alice"
    assert deadline == claims["exp"] + 30


def test_token_without_kid_tries_compatible_keys(idp):
    ks = keyset(idp)
    for key in idp.keys:
        claims, _ = verifier(idp).verify(idp.mint(key=key, kid=None), ks)
        assert claims["sub"] == "alice"


def test_es512_verifies():
    key = SigningKey("EC")
    from cryptography.hazmat.primitives.asymmetric import ec
    key.private = ec.generate_private_key(ec.SECP521R1())
    key.public = key.private.public_key()
    key.alg = "ES512"
    ks = parse_jwks({"keys": [key.jwk()]})
    token = pyjwt.encode({"iss": "i", "exp": time.time() + 60}, key.private, "ES512", headers={"kid": key.kid})
    assert Verifier(issuer="i").verify(token, ks)[0]["iss"] == "i"


def _bad_tokens(idp):
    """(name, token, expected reason) for one RSA key."""
    key = idp.keys[0]
    now = int(time.time())
    good = idp.mint(key=key)
    h, p, s = good.split(".")
    other = SigningKey("RSA", kid=key.kid)           # same kid, different key
    return [
        ("expired", idp.mint(key=key, exp=now - 100), "token expired"),
        ("expired exactly at skew", idp.mint(key=key, exp=now - 30), "token expired"),
        ("not yet valid", idp.mint(key=key, nbf=now + 100), "token not yet valid"),
        ("issued in the future", idp.mint(key=key, iat=now + 100), "token issued in the future"),
        ("wrong issuer", idp.mint(key=key, iss="https://evil.example"), "invalid issuer"),
        ("no issuer", idp.mint(key=key, iss=None), "missing issuer"),
        ("wrong audience", idp.mint(key=key, aud="other"), "invalid audience"),
        ("wrong audience list", idp.mint(key=key, aud=["a", "b"]), "invalid audience"),
        ("no audience", idp.mint(key=key, aud=None), "missing audience"),
        ("audience not strings", idp.mint(key=key, aud=["agents", 1]), "invalid audience"),
        ("exp as string", idp.mint(key=key, exp=str(now + 100)), "invalid 'exp' claim"),
        ("exp as bool", idp.mint(key=key, exp=True), "invalid 'exp' claim"),
        ("sub not a string", idp.mint(key=key, sub=42), "invalid 'sub' claim"),
        ("unknown kid", idp.mint(key=key, kid="nope"), "unknown signing key"),
        ("wrong key same kid", idp.mint(key=other), "invalid signature"),
        ("alg none", unsigned_token(idp.claims(), kid=key.kid), "algorithm not allowed"),
        ("alg none no kid", unsigned_token(idp.claims()), "algorithm not allowed"),
        ("HS256 with the public key PEM", hs256_with_public_key(idp.claims(), key), "algorithm not allowed"),
        ("HS256 with the JWK", hs256_with_public_key(idp.claims(), key, pem=False), "algorithm not allowed"),
        ("alg swapped RS→PS", with_header(good, alg="PS256"), "no signing key for this algorithm"),
        ("crit header", idp.mint(key=key, headers={"crit": ["exp"], "exp": 1}), "unsupported critical header parameter"),
        ("payload tampered", f"{h}.{b64url(json.dumps(idp.claims(sub='admin')).encode())}.{s}", "invalid signature"),
        ("truncated signature", good[:-10], "invalid signature"),
        ("garbled base64", f"{h}.{p}.{s[:-4]}*&^%", "malformed token"),
        ("garbled header", f"!!{h}.{p}.{s}", "malformed token"),
        ("header not JSON", f"{b64url(b'not json')}.{p}.{s}", "malformed token"),
        ("header is a list", f"{b64url(b'[1]')}.{p}.{s}", "malformed token"),
        ("two parts", f"{h}.{p}", "malformed token"),
        ("JWE", "a.b.c.d.e", "encrypted tokens are not supported"),
        ("empty", "", "malformed token"),
        ("20 KB", "a" * 20_000, "token too large"),
        ("non-ascii", f"{h}.{p}.{s}é", "malformed token"),
    ]


def test_bad_token_table(idp):
    v = verifier(idp)
    ks = keyset(idp)
    for name, token, reason in _bad_tokens(idp):
        with pytest.raises(JwtError) as info:
            v.verify(token, ks)
        assert info.value.reason == reason, name
        assert isinstance(info.value, UnknownKeyError) == (reason == "unknown signing key"), name


def test_bad_ecdsa_signature_lengths(idp):
    key = next(k for k in idp.keys if k.kind == "EC")
    h, p, s = idp.mint(key=key).split(".")
    sig = base64.urlsafe_b64decode(s + "==")
    for bad in (sig[:-1], sig + b"\x00", b"", sig[::-1]):
        with pytest.raises(JwtError, match="invalid signature"):
            verifier(idp).verify(f"{h}.{p}.{b64url(bad)}", keyset(idp))


def test_algorithm_allowlist(idp):
    ec_key = next(k for k in idp.keys if k.kind == "EC")
    v = verifier(idp, algorithms=["RS256"])
    with pytest.raises(JwtError, match="algorithm not allowed"):
        v.verify(idp.mint(key=ec_key), keyset(idp))
    for forbidden in (["none"], ["HS256"], ["RS256", "HS512"]):
        with pytest.raises(ValueError, match="never accepted"):
            Verifier(issuer="x", algorithms=forbidden)
    with pytest.raises(ValueError, match="unsupported"):
        Verifier(issuer="x", algorithms=["RS1"])


def test_required_claims_and_clock_skew(idp):
    key = idp.keys[0]
    now = int(time.time())
    v = verifier(idp, required_claims=["sub", "tenant"])
    with pytest.raises(JwtError, match="missing required claim 'tenant'"):
        v.verify(idp.mint(key=key), keyset(idp))
    assert v.verify(idp.mint(key=key, tenant="t1"), keyset(idp))[0]["tenant"] == "t1"
    # within the skew: accepted; beyond: refused
    lenient = verifier(idp, leeway=60)
    assert lenient.verify(idp.mint(key=key, exp=now - 30), keyset(idp))
    assert lenient.verify(idp.mint(key=key, nbf=now + 30), keyset(idp))
    with pytest.raises(JwtError, match="expired"):
        verifier(idp, leeway=0).verify(idp.mint(key=key, exp=now - 1), keyset(idp))


def test_no_audiences_configured_does_not_check_aud(idp):
    v = verifier(idp, audiences=())
    assert v.verify(idp.mint(key=idp.keys[0], aud="anything"), keyset(idp))


def test_agrees_with_pyjwt(idp):
    """Differential test: our verdict is pyjwt's verdict on the same inputs.

    pyjwt is given the key object the kid names, the same allowlist, issuer,
    audiences, leeway and required claims. Known, documented differences are
    excluded (numeric strings for exp; pyjwt's crit handling; alg/key family
    mismatches pyjwt reports differently).
    """
    ks = keyset(idp, with_alg=False)
    v = verifier(idp, required_claims=["sub"])
    by_kid = {k.kid: k for k in idp.keys}
    key = idp.keys[0]
    now = int(time.time())
    tokens = [t for _, t, _ in _bad_tokens(idp)
              if not t.startswith("a" * 10)] + [
        idp.mint(key=key), idp.mint(key=key, alg="PS384"), idp.mint(key=key, aud=["x", "agents"]),
        idp.mint(key=key, exp=now - 29), idp.mint(key=key, nbf=now + 29), idp.mint(key=key, sub=None),
        idp.mint(key=key, exp=None),
    ] + [idp.mint(key=k) for k in idp.keys]
    skip_reasons = {"invalid 'exp' claim", "unsupported critical header parameter"}
    compared = 0
    for token in tokens:
        try:
            ours = v.verify(token, ks)[0]
        except JwtError as exc:
            if exc.reason in skip_reasons:
                continue
            ours = None
        try:
            hdr = pyjwt.get_unverified_header(token)
            k = by_kid[hdr.get("kid")] if "kid" in hdr else key     # KeyError: unknown kid
            theirs = pyjwt.decode(token, k.public,
                                  algorithms=sorted(v.algorithms), audience=["agents"],
                                  issuer=idp.issuer, leeway=30, options={"require": ["sub"]})
        except (pyjwt.PyJWTError, ValueError, TypeError, KeyError):
            theirs = None
        assert (ours is None) == (theirs is None), token
        if ours is not None:
            assert ours == theirs
        compared += 1
    assert compared >= 30


def test_peek_claims(idp):
    assert peek_claims(idp.mint(sub="bob"))["sub"] == "bob"
    with pytest.raises(JwtError):
        peek_claims("x.y")


# ---------------------------------------------------------------------------------
# The verified-token cache
# ---------------------------------------------------------------------------------

def test_cache_expires_at_exp_plus_skew():
    c = TokenCache(10)
    c.put(b"a", {"sub": "x"}, deadline=100.0, now=50.0)
    assert c.get(b"a", 99.9) == {"sub": "x"}
    assert c.get(b"a", 100.0) is None
    assert len(c) == 0


def test_cache_is_bounded():
    c = TokenCache(100)
    for i in range(1000):
        c.put(str(i).encode(), {}, deadline=1e12, now=0.0)
        assert len(c) <= 100
    assert c.get(b"999", 1.0) is not None
    assert c.get(b"0", 1.0) is None
    # expired entries go first
    c = TokenCache(10)
    for i in range(10):
        c.put(str(i).encode(), {}, deadline=5.0 if i % 2 else 1e12, now=0.0)
    c.put(b"new", {}, deadline=1e12, now=10.0)
    assert len(c) == 6 and c.get(b"0", 10.0) is not None


def test_provider_caches_and_clock_boundaries(idp):
    clock = [time.time()]
    p = static_provider("p", idp.jwks(), issuer=idp.issuer, audiences=["agents"], clock_skew=0)
    p._clock = lambda: clock[0]
    token = idp.mint(key=idp.keys[0], exp=int(clock[0]) + 10)
    first = p.verify_now(token)
    assert p.verify_now(token) is first and p.cache.hits == 1
    clock[0] = first["exp"] - 0.001
    assert p.verify_now(token) is first
    clock[0] = first["exp"]
    with pytest.raises(JwtError, match="expired"):
        p.verify_now(token)


def test_cache_never_serves_a_different_token(idp):
    p = static_provider("p", idp.jwks(), issuer=idp.issuer, audiences=["agents"])
    t1, t2 = idp.mint(key=idp.keys[0], sub="u1"), idp.mint(key=idp.keys[0], sub="u2")
    assert p.verify_now(t1)["sub"] == "u1" and p.verify_now(t2)["sub"] == "u2"
    assert p.verify_now(t1)["sub"] == "u1"
    tampered = t1[:-3] + ("AAA" if not t1.endswith("AAA") else "BBB")
    with pytest.raises(JwtError):
        p.verify_now(tampered)


def test_provider_group_selects_by_issuer(idp):
    a = static_provider("a", idp.jwks(), issuer="https://a.example", audiences=["agents"])
    b = static_provider("b", idp.jwks(), issuer="https://b.example", audiences=["agents"])
    g = ProviderGroup([a, b])
    assert asyncio.run(g.verify(idp.mint(iss="https://b.example")))[0] is b
    with pytest.raises(JwtError, match="untrusted issuer"):
        g.verify_now(idp.mint(iss="https://c.example"))
    with pytest.raises(JwtError, match="missing issuer"):
        g.verify_now(idp.mint(iss=None))


# ---------------------------------------------------------------------------------
# Remote JWKS: discovery, refresh, rotation, rate limits, outages
# ---------------------------------------------------------------------------------

class FakeClock:
    """An injected monotonic clock: tests move time instead of sleeping through intervals."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def remote_provider(idp, **kw) -> JwtProvider:
    kw.setdefault("min_ttl", 1.0)
    src_kw = {k: kw.pop(k) for k in list(kw) if k in ("min_ttl", "max_ttl", "default_ttl", "refetch_interval",
                                                       "url", "discovery", "clock")}
    if "url" not in src_kw and "discovery" not in src_kw:
        src_kw["discovery"] = idp.discovery_url
    source = RemoteKeySource(issuer=idp.issuer, name="test", timeout=2.0, **src_kw)
    return JwtProvider("test", Verifier(issuer=idp.issuer, audiences=["agents"], leeway=30), source)


def run(coro):
    return asyncio.run(coro)


def test_discovery_then_jwks():
    with IdP() as idp:
        async def main():
            p = remote_provider(idp)
            assert p.source.keys is None and p.not_ready() is not None
            claims = await p.verify(idp.mint())
            assert claims["sub"] == "alice" and p.not_ready() is None
            assert p.source.jwks_uri == idp.jwks_url
            # a keyed, in-memory verification is synchronous from now on
            assert isinstance(p.verify_now(idp.mint(sub="bob")), dict)
            await p.stop()
        run(main())
        assert idp.discovery_fetches == 1 and idp.jwks_fetches == 1


def test_discovery_issuer_mismatch_is_refused():
    with IdP(issuer="https://someone-else.example") as idp:
        async def main():
            source = RemoteKeySource(discovery=idp.discovery_url, issuer=idp.url, name="t", min_ttl=1)
            assert await source.ensure() is None
            assert "does not match the configured issuer" in source.not_ready()
        run(main())


def test_no_keys_ever_fails_closed():
    with IdP() as idp:
        idp.down = True

        async def main():
            p = remote_provider(idp, url=idp.jwks_url, refetch_interval=60)
            with pytest.raises(JwtError, match="signing keys unavailable"):
                await p.verify(idp.mint())
            assert "HTTP 503" in p.not_ready()
            # within the refetch interval, no new fetch: fail fast
            with pytest.raises(JwtError, match="signing keys unavailable"):
                await p.verify(idp.mint())
        run(main())
        assert idp.jwks_fetches == 1


def test_unreachable_endpoint_fails_closed():
    from tests.support.ports import free_port
    url = f"http://127.0.0.1:{free_port()}/jwks.json"

    async def main():
        source = RemoteKeySource(url=url, name="t", timeout=1.0)
        assert await source.ensure() is None
        assert source.not_ready().startswith("no signing keys yet: fetching")
    run(main())


def test_rotation_unknown_kid_triggers_one_refetch():
    with IdP() as idp:
        async def main():
            clock = FakeClock()
            p = remote_provider(idp, url=idp.jwks_url, refetch_interval=0.3, clock=clock)
            old_token = idp.mint()
            await p.verify(old_token)
            new_key = idp.add_key("EC")
            # right after a fetch, an unknown kid is refused without fetching again
            with pytest.raises(JwtError, match="unknown signing key"):
                p.verify_now(idp.mint(key=new_key))
            clock.advance(0.35)
            new_token = idp.mint(key=new_key)
            result = p.verify_now(new_token)
            assert not isinstance(result, dict)        # needs a refetch
            assert (await result)["sub"] == "alice"
            assert idp.jwks_fetches == 2
            # both keys work, synchronously
            assert isinstance(p.verify_now(old_token), dict) and isinstance(p.verify_now(new_token), dict)
        run(main())


def test_random_kids_do_not_amplify_fetches():
    with IdP() as idp:
        async def main():
            clock = FakeClock()
            p = remote_provider(idp, url=idp.jwks_url, refetch_interval=0.5, clock=clock)
            await p.verify(idp.mint())
            assert idp.jwks_fetches == 1
            clock.advance(0.55)
            # a burst, concurrently: one shared refetch
            results = await asyncio.gather(*(p.verify(idp.mint(kid=f"random-{i}")) for i in range(50)),
                                           return_exceptions=True)
            assert all(isinstance(r, JwtError) and r.reason == "unknown signing key" for r in results)
            assert idp.jwks_fetches == 2
            # then, within the interval: refused without any fetch, synchronously
            for i in range(50):
                with pytest.raises(JwtError, match="unknown signing key"):
                    p.verify_now(idp.mint(kid=f"again-{i}"))
            assert idp.jwks_fetches == 2
            clock.advance(0.55)
            with pytest.raises(JwtError):
                await p.verify(idp.mint(kid="later"))
            assert idp.jwks_fetches == 3
        run(main())


def test_down_endpoint_keeps_last_good_keys():
    with IdP() as idp:
        async def main():
            clock = FakeClock()
            p = remote_provider(idp, url=idp.jwks_url, refetch_interval=0.1, clock=clock)
            token = idp.mint()
            await p.verify(token)
            idp.down = True
            keys_before = p.source.keys
            assert await p.source._fetch(full=True) is keys_before
            assert p.source.keys is keys_before and p.not_ready() is None
            assert "HTTP 503" in p.source.last_error
            p.cache.clear()
            assert (await p.verify(token))["sub"] == "alice"
            clock.advance(0.15)
            with pytest.raises(JwtError, match="unknown signing key"):
                await p.verify(idp.mint(kid="rotated-while-down"))
            assert p.source.keys is keys_before
        run(main())


def test_rotated_out_key_is_not_served_from_cache():
    with IdP() as idp:
        async def main():
            p = remote_provider(idp, url=idp.jwks_url, refetch_interval=60)
            old_token = idp.mint()
            await p.verify(old_token)
            assert len(p.cache) == 1
            # same keys again: same KeySet object, cache kept
            same = p.source.keys
            await p.source._fetch(full=True)
            assert p.source.keys is same
            p.verify_now(old_token)
            assert p.cache.hits == 1
            idp.rotate()
            await p.source._fetch(full=True)
            assert p.source.keys is not same
            with pytest.raises(JwtError, match="unknown signing key"):
                p.verify_now(old_token)
            assert len(p.cache) == 0
            assert isinstance(p.verify_now(idp.mint()), dict)
        run(main())


@pytest.mark.parametrize("header,age,expected", [
    ("max-age=120", None, 120.0),
    ("public, max-age=7200, must-revalidate", None, 7200.0),
    ("max-age=120", "20", 100.0),
    ("max-age=0", None, 30.0),
    ("no-store", None, 30.0),
    ("no-cache, max-age=600", None, 30.0),
    ("max-age=999999999", None, 86400.0),
    ("max-age=abc", None, 600.0),
    (None, None, 600.0),
])
def test_cache_control_lifetime(header, age, expected):
    h = Headers()
    if header:
        h.add("cache-control", header)
    if age:
        h.add("age", age)
    assert cache_lifetime(h, 600.0, 30.0, 86400.0) == expected


def test_background_refresh_honours_max_age():
    with IdP(cache_control="max-age=1") as idp:
        async def main():
            source = RemoteKeySource(url=idp.jwks_url, name="t", min_ttl=1.0, default_ttl=600)
            await source.start()
            try:
                deadline = time.monotonic() + 5
                while idp.jwks_fetches < 3 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert source.ttl == 1.0
                assert idp.jwks_fetches >= 3          # refreshed at ~0.8 s intervals
                assert source.next_refresh_delay() <= 0.8
            finally:
                await source.stop()
        run(main())


def test_background_refresh_schedule_and_backoff():
    now = [1000.0]
    src = RemoteKeySource(url="http://127.0.0.1:1/jwks", name="t", min_ttl=30, default_ttl=600,
                          clock=lambda: now[0])
    assert src.next_refresh_delay() == 0.0                  # nothing fetched yet
    src.fetched_at, src.ttl = 1000.0, 600.0
    assert src.next_refresh_delay() == pytest.approx(480.0)  # 80 % of the lifetime
    src.failures, src.last_attempt = 1, 1000.0
    assert src.next_refresh_delay() == 1.0
    src.failures = 4
    assert src.next_refresh_delay() == 8.0
    src.failures = 20
    assert src.next_refresh_delay() == 30.0                  # capped at min_ttl


def test_keyset_candidates():
    a, b = SigningKey("RSA", kid="a"), SigningKey("EC", kid="b")
    ks = KeySet([parse_jwk(a.jwk()), parse_jwk(b.jwk())])
    assert [k.kid for k in ks.candidates("a", "RS256")] == ["a"]
    assert ks.candidates("a", "ES256") == ()
    assert ks.candidates("zzz", "RS256") is None
    assert [k.kid for k in ks.candidates(None, "ES256")] == ["b"]


def test_base64url_is_strict():
    from agproxy.identity.jwks import b64url_decode
    import os
    for raw in (b"", b"a", b"ab", b"abc", os.urandom(33), os.urandom(256)):
        assert b64url_decode(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()) == raw
    for bad in ("ab+c", "ab/c", "abc=", "YQ==", "a", "ab c", "ab\nc", "abé", "a.bc"):
        with pytest.raises(ValueError):
            b64url_decode(bad)


def test_standard_base64_signature_variant_is_refused(idp):
    """A signature re-encoded with '+' '/' (same bytes) is not the same token."""
    v, ks = verifier(idp), keyset(idp)
    for _ in range(20):
        token = idp.mint(key=idp.keys[0])
        h, p, s = token.split(".")
        if "-" in s or "_" in s:
            variant = f"{h}.{p}.{s.replace('-', '+').replace('_', '/')}"
            with pytest.raises(JwtError, match="malformed"):
                v.verify(variant, ks)
            return
    pytest.skip("no signature with - or _ in 20 tries")
