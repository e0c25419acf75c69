"""Identity, a library for filters and backends: inbound JWT validation (JWKS sources,
verification, shared providers), the gateway's own token minting and RFC 8693 token
exchange, workload (actor) credentials, and AWS credentials and SigV4.

It never imports proxy/, backends/, filters/ or server/ (tests/unit/test_layering.py):
the token service's HTTP endpoints live in backends/token_service.py.

Entry points for other layers: `agproxy.identity.providers.JwtProvider.verify(token)`
(claims or `JwtError`) and `ctx.jwt_providers[NAME]` for named `[jwt_provider.*]`.
"""
