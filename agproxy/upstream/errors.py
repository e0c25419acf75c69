"""Why an upstream call failed, in the terms the proxy maps to a status."""


class UpstreamError(Exception):
    """kind: 'connect' (→ 502), 'timeout' (→ 504), 'protocol' or 'reset' (→ 502)."""

    def __init__(self, kind: str, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable   # failed before any response byte on a reused connection


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str = "upstream timed out"):
        super().__init__("timeout", message)
