"""Identity: inbound JWT validation (JWKS sources, verification, shared providers),
the gateway's own token minting and token-exchange service, and AWS credentials.

Entry points for other layers: `agproxy.identity.providers.JwtProvider.verify(token)`
(claims or `JwtError`) and `ctx.jwt_providers[NAME]` for named `[jwt_provider.*]`.
"""
