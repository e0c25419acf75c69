"""telemetry/otlp.py Sender to an http:// collector: its own kept-alive socket, the
answer read with httptools. A real collector stand-in on 127.0.0.1 parses each POST
strictly (httptools) and answers from a script; the tests assert the exact bytes it got,
how many connections they came on, and what `send` returns."""

from __future__ import annotations

import socket
import threading

import httptools

from agproxy.telemetry.otlp import Sender

DEADLINE = 10.0


class Collector:
    """Accepts connections; for each request parsed, the next scripted answer is sent,
    then the connection is closed when the script says so."""

    def __init__(self, answers: list[tuple[bytes, bool]]):
        self.answers = answers            # (raw answer, close after it)
        self.requests: list[tuple[int, str, dict, bytes]] = []   # (connection no., url, headers, body)
        self.cond = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(DEADLINE)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1/traces"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        n = 0
        while self.answers:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            n += 1
            self._connection(conn, n)

    def _connection(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(DEADLINE)
        with conn:
            while self.answers:
                req = {"headers": {}, "body": b"", "url": b"", "done": False}

                class P:
                    def on_url(self, url): req["url"] += url
                    def on_header(self, k, v): req["headers"][k.decode().lower()] = v.decode()
                    def on_body(self, b): req["body"] += b
                    def on_message_complete(self): req["done"] = True

                parser = httptools.HttpRequestParser(P())
                while not req["done"]:
                    data = conn.recv(65536)
                    if not data:
                        return
                    parser.feed_data(data)
                assert parser.get_method() == b"POST"
                answer, close = self.answers.pop(0)
                with self.cond:
                    self.requests.append((n, req["url"].decode(), req["headers"], req["body"]))
                    self.cond.notify_all()
                conn.sendall(answer)
                if close:
                    return

    def wait_requests(self, count: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.requests) >= count, DEADLINE)

    def close(self) -> None:
        self.listener.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"


def test_exports_share_one_connection_and_carry_the_exact_body_and_headers():
    c = Collector([(OK, False), (OK, False)])
    s = Sender(c.url, env={"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%20ecret"})
    try:
        assert s.send(b"\x0a\x00first") is None
        assert s.send(b"second" * 1000) is None
        c.wait_requests(2)
        (n1, url1, h1, b1), (n2, _, h2, b2) = c.requests
        assert (n1, n2) == (1, 1)                    # kept alive
        assert url1 == "/v1/traces" and b1 == b"\x0a\x00first" and b2 == b"second" * 1000
        assert h1["content-type"] == "application/x-protobuf" and h1["api-key"] == "s ecret"
        assert h1["content-length"] == "7" and h2["content-length"] == "6000"
        assert h1["host"] == c.url.split("/")[2]
    finally:
        s.close()
        c.close()


def test_a_connection_the_collector_closed_while_idle_is_replaced_without_losing_the_export():
    c = Collector([(OK, True), (OK, False)])        # closes after the first answer, says nothing
    s = Sender(c.url, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "0.4"})   # no time for a backoff retry
    try:
        assert s.send(b"one") is None
        c.wait_requests(1)
        c.thread.join(0)                              # (the server side may still be closing)
        sock = s.plain.sock
        assert sock is not None
        # wait (with a deadline) until the close has reached our socket
        sock.settimeout(DEADLINE)
        assert sock.recv(1, socket.MSG_PEEK) == b""
        assert s.send(b"two") is None
        c.wait_requests(2)
        assert [(n, b) for n, _, _, b in c.requests] == [(1, b"one"), (2, b"two")]
    finally:
        s.close()
        c.close()


def test_a_retryable_status_is_retried_and_a_chunked_close_answer_is_read():
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
               b"2\r\n\x0a\x00\r\n0\r\n\r\n")
    c = Collector([(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy", False),
                   (chunked, True), (b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", False)])
    s = Sender(c.url, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "5"})
    try:
        assert s.send(b"x") is None                   # 503, then 200 after the backoff
        assert s.send(b"y") == "HTTP 400"             # not retryable: one request
        c.wait_requests(3)
        assert [(n, b) for n, _, _, b in c.requests] == [(1, b"x"), (1, b"x"), (2, b"y")]
    finally:
        s.close()
        c.close()


def test_a_collector_that_is_down_is_an_error_not_an_exception():
    port_holder = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port_holder.getsockname()[1]}/v1/traces"
    port_holder.close()
    s = Sender(url, env={"OTEL_EXPORTER_OTLP_TIMEOUT": "0.2"})
    try:
        why = s.send(b"x")
        assert why is not None and "Connection" in why
    finally:
        s.close()
