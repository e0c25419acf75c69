"""Micro-benchmarks behind two data-path choices (results in benchmarks/RESULTS.md).

1. HTTP/1.1 parsing: httptools (llhttp) against h11, for what a relay does per
   request: parse a request head from bytes, parse an upstream response, and
   serialise both directions.
2. TLS record layer: the stdlib `ssl` (what uvloop's native TLS transport drives,
   through an SSLObject over memory BIOs) against pyOpenSSL (cffi), both on
   memory BIOs so that only the library cost is measured: a handshake, then
   100-byte application records in both directions.

Run: .venv/bin/python benchmarks/micro_choices.py   (installs nothing; h11 and
pyOpenSSL must be importable: pip install h11 pyopenssl into the venv).
Reports CPU µs per operation, best of 5 rounds.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
import time
from pathlib import Path

REQUEST = (b"POST /agents/support/invocations HTTP/1.1\r\nHost: api.example.com\r\n"
           b"User-Agent: bench/1.0\r\nAccept: */*\r\nContent-Type: application/json\r\n"
           b"Authorization: Bearer abc.def.ghi\r\nX-Request-Id: 0123456789abcdef\r\n"
           b"Content-Length: 17\r\n\r\n{\"prompt\":\"hi!\"}\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 100\r\nConnection: keep-alive\r\n\r\n" + b"x" * 100)


def best(fn, n: int, rounds: int = 5) -> float:
    out = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn()
        out.append((time.process_time() - t) / n * 1e6)
    return min(out)


def httptools_cycle() -> None:
    import httptools

    class P:
        def __init__(self):
            self.headers = []
            self.body = b""
            self.url = b""

        def on_url(self, u):
            self.url += u

        def on_header(self, n, v):
            self.headers.append((n, v))

        def on_body(self, b):
            self.body += b

    req = P()
    httptools.HttpRequestParser(req).feed_data(REQUEST)
    head = b"POST " + req.url + b" HTTP/1.1\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in req.headers) + b"\r\n"
    resp = P()
    httptools.HttpResponseParser(resp).feed_data(RESPONSE)
    out = b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in resp.headers) + b"\r\n" + resp.body
    assert head and out


def h11_cycle() -> None:
    import h11
    server = h11.Connection(h11.SERVER)
    server.receive_data(REQUEST)
    req = server.next_event()
    body = server.next_event()
    server.next_event()
    client = h11.Connection(h11.CLIENT)
    head = client.send(h11.Request(method=req.method, target=req.target, headers=req.headers))
    head += client.send(h11.Data(data=body.data)) + client.send(h11.EndOfMessage())
    client.receive_data(RESPONSE)
    resp = client.next_event()
    data = client.next_event()
    client.next_event()
    out = server.send(h11.Response(status_code=resp.status_code, headers=resp.headers))
    out += server.send(h11.Data(data=data.data)) + server.send(h11.EndOfMessage())
    assert head and out


def make_cert(directory: Path) -> tuple[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.certs import make_certs
    c = make_certs(directory)
    return c["cert"], c["key"]


def stdlib_tls(cert: str, key: str):
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(cert, key)
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE

    def pair():
        si, so, ci, co = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        s = sctx.wrap_bio(si, so, server_side=True)
        c = cctx.wrap_bio(ci, co, server_hostname="localhost")
        for _ in range(10):
            for obj in (c, s):
                try:
                    obj.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            si.write(co.read())
            ci.write(so.read())
        return s, c, si, so, ci, co

    s, c, si, so, ci, co = pair()
    payload = b"x" * 100

    def record():
        c.write(payload)
        si.write(co.read())
        s.read(4096)
        s.write(payload)
        ci.write(so.read())
        c.read(4096)
    return (lambda: pair()), record


def pyopenssl_tls(cert: str, key: str):
    from OpenSSL import SSL
    sctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    sctx.use_certificate_file(cert)
    sctx.use_privatekey_file(key)
    cctx = SSL.Context(SSL.TLS_CLIENT_METHOD)

    def pair():
        s = SSL.Connection(sctx, None)
        s.set_accept_state()
        c = SSL.Connection(cctx, None)
        c.set_connect_state()
        for _ in range(10):
            for obj in (c, s):
                try:
                    obj.do_handshake()
                except SSL.WantReadError:
                    pass
            try:
                s.bio_write(c.bio_read(65536))
            except SSL.WantReadError:
                pass
            try:
                c.bio_write(s.bio_read(65536))
            except SSL.WantReadError:
                pass
        return s, c

    s, c = pair()
    payload = b"x" * 100

    def record():
        c.send(payload)
        s.bio_write(c.bio_read(65536))
        s.recv(4096)
        s.send(payload)
        c.bio_write(s.bio_read(65536))
        c.recv(4096)
    return (lambda: pair()), record


def main() -> None:
    print("HTTP/1.1 relay cycle (parse request + response, serialise both), CPU µs:")
    print(f"  httptools {best(httptools_cycle, 20000):7.1f}")
    try:
        print(f"  h11       {best(h11_cycle, 5000):7.1f}")
    except ImportError:
        print("  h11       (not installed)")
    with tempfile.TemporaryDirectory() as d:
        cert, key = make_cert(Path(d))
        print("TLS on memory BIOs, CPU µs: handshake (both ends) | 100-byte record each way")
        hs, rec = stdlib_tls(cert, key)
        print(f"  stdlib ssl (uvloop's native TLS) {best(hs, 200):8.1f} | {best(rec, 20000):6.1f}")
        try:
            hs, rec = pyopenssl_tls(cert, key)
            print(f"  pyOpenSSL                        {best(hs, 200):8.1f} | {best(rec, 20000):6.1f}")
        except ImportError:
            print("  pyOpenSSL (not installed)")


if __name__ == "__main__":
    main()
