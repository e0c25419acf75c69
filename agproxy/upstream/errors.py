"""Why an upstream call failed, in the terms the proxy maps to a status, and whether
the pool may send the request again."""


class UpstreamError(Exception):
    """kind: 'connect' (→ 502), 'timeout' (→ 504), 'protocol' or 'reset' (→ 502).

    `retryable`: the request failed before any response byte and can be sent again
    on another connection. `maybe_processed`: the upstream may have read and acted
    on it (an HTTP/1.1 connection closed with no answer: an idle close racing our
    write looks the same as a crash after processing), so only an idempotent
    request (RFC 9110 §9.2.2) may be sent again. An HTTP/2 stream refused
    (REFUSED_STREAM) or above a GOAWAY's last stream id was never processed.
    """

    def __init__(self, kind: str, message: str, *, retryable: bool = False,
                 maybe_processed: bool = False):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.maybe_processed = maybe_processed


class UpstreamTimeout(UpstreamError):
    def __init__(self, message: str = "upstream timed out"):
        super().__init__("timeout", message)
