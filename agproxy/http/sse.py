"""Server-sent events: split a byte stream into events, parse and format one event.

Theory of operation: `SseSplitter.feed(chunk)` returns the events the chunk
completed, each as its raw bytes up to and including the blank line that ends it,
whatever the chunking (one byte at a time, or many events per chunk); `end()`
returns what is left (an unterminated event, which the specification says a
client discards). Joined, the raw events and the remainder are exactly the bytes
fed, so a hook that passes an event on unchanged passes it on byte for byte.

Line ends follow the WHATWG HTML "event stream interpretation": CRLF, LF or CR,
freely mixed; a CR at the end of one chunk whose LF arrives in the next is one
line end (the LF is kept as the first byte of the next raw event, where `parse`
reads it as an empty line before any field, which dispatches nothing). An event
(or the part of one still being buffered) larger than `max_event` bytes raises
`SseError`: a stream cannot make the gateway buffer without bound.

`parse(raw)` interprets one raw event as the specification does (UTF-8 with
replacement, a leading BOM ignored, comments, `field: value` with one optional
space, `data` lines joined with LF, `id` without NUL, `retry` digits only, other
fields ignored) and returns None when the event dispatches nothing (no data).
`format_event` writes one back.
"""

from __future__ import annotations

import re

_EOL = re.compile(rb"[\r\n]")
_LINES = re.compile(r"\r\n|\r|\n")
_CR, _LF = 13, 10
MAX_EVENT = 4 * 1024 * 1024


class SseError(ValueError):
    """The stream broke a limit (an event over max_event bytes)."""


class SseSplitter:
    __slots__ = ("max_event", "_buf", "_scan", "_line_start", "_after_cr")

    def __init__(self, max_event: int = MAX_EVENT):
        self.max_event = max_event
        self._buf = bytearray()
        self._scan = 0          # bytes of _buf already searched for line ends
        self._line_start = 0    # where the current line began
        self._after_cr = False  # the last line end was a CR at the end of _buf

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        if not self._after_cr and buf.find(b"\r", self._scan) < 0:
            return self._feed_lf(buf)
        n = len(buf)
        i = self._scan
        line_start = self._line_start
        if self._after_cr and i < n:
            self._after_cr = False
            if buf[i] == _LF:          # the LF of a CRLF split across chunks
                i += 1
                line_start = i
        events = []
        search = _EOL.search
        while True:
            m = search(buf, i)
            if m is None:
                break
            p = m.start()
            end = p + 1
            if buf[p] == _CR:
                if end < n:
                    if buf[end] == _LF:
                        end += 1
                else:
                    self._after_cr = True
            empty = p == line_start
            i = line_start = end
            if empty:
                if end > self.max_event:
                    raise SseError(f"an event exceeds {self.max_event} bytes")
                events.append(bytes(buf[:end]))
                del buf[:end]
                n = len(buf)
                i = line_start = 0
        if n > self.max_event:
            raise SseError(f"an event exceeds {self.max_event} bytes")
        self._scan = i
        self._line_start = line_start
        return events

    def _feed_lf(self, buf: bytearray) -> list[bytes]:
        """No CR in the unsearched bytes (what every LLM provider sends): an event ends
        at the second LF of an `LF LF` pair, or at an LF that opens it (an empty first
        line); an LF right after a CR is never an empty line (a CRLF is merged, and a CR
        last in the buffer takes the other path). One `find(b"\n\n")` per event, not one
        `find(b"\n")` per line: each bytes method call costs ~1.5k instructions (its
        argument parsing), the scan ~3 a byte. Measured with callgrind on
        benchmarks/instructions.py h1-llm-stream (10 one-line events): a regex search per
        line end cost 228k, a find per LF 63k, less again with one split per chunk (git log)."""
        events = []
        find = buf.find             # no copy of buf: a slow event may arrive a byte at a time
        n = len(buf)
        max_event = self.max_event
        start = 0
        pos = self._scan - 1 if self._scan else 0    # an LF last time may pair with one now
        if not self._scan and n and buf[0] != _LF and find(b"\n\n\n") < 0:
            # Nothing carried over and no event opens with an empty line (the usual
            # case): every `LF LF` ends an event, so one split finds them all (three
            # calls in all instead of one find per event). The copy and scans cover only
            # this chunk's bytes: a slow event arriving a byte at a time is carried over
            # and goes through the loop below, linear.
            parts = bytes(buf).split(b"\n\n")
            rest = parts.pop()
            for part in parts:
                if len(part) + 2 > max_event:
                    raise SseError(f"an event exceeds {max_event} bytes")
                events.append(part + b"\n\n")
            start = n - len(rest)
        else:
            at_line_start = self._line_start == 0
            while True:
                if at_line_start and start < n and buf[start] == _LF:
                    end = start + 1
                else:
                    p = find(b"\n\n", pos if pos > start else start)
                    if p < 0:
                        break
                    end = p + 2
                if end - start > max_event:
                    raise SseError(f"an event exceeds {max_event} bytes")
                events.append(bytes(buf[start:end]))
                start = end
                at_line_start = True
        if start:
            del buf[:start]
            n = len(buf)
            self._line_start = buf.rfind(b"\n") + 1 if n else 0
        else:   # only the new bytes: a long line arriving a byte at a time stays linear
            last = buf.rfind(b"\n", pos)
            if last >= 0:
                self._line_start = last + 1
        if n > max_event:
            raise SseError(f"an event exceeds {max_event} bytes")
        self._scan = n
        # (_line_start, for the CR path should a CR come, is after the last LF: a line
        # ended by a CR earlier in the buffer is not seen, which changes nothing, the
        # next line end being past it either way.)
        return events

    @property
    def idle(self) -> bool:
        """Nothing carried over: the next byte fed starts a new event."""
        return not self._buf and not self._after_cr

    def end(self) -> bytes:
        """The bytes of an unterminated last event (b"" when the stream ended cleanly)."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._scan = self._line_start = 0
        self._after_cr = False
        return rest


class Event:
    __slots__ = ("event", "data", "id", "retry", "comments")

    def __init__(self, data: str = "", event: str | None = None, id: str | None = None,
                 retry: int | None = None, comments: list[str] | None = None):
        self.data = data
        self.event = event          # None: the default type, "message"
        self.id = id
        self.retry = retry
        self.comments = comments if comments is not None else []

    @property
    def type(self) -> str:
        return self.event or "message"

    def __repr__(self) -> str:
        return f"Event(data={self.data!r}, event={self.event!r}, id={self.id!r}, retry={self.retry!r})"


def parse(raw: bytes) -> Event | None:
    """One raw event (as SseSplitter yields it) → an Event, or None if it dispatches nothing."""
    text = raw.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    data: list[str] = []
    ev = Event()
    for line in (text.split("\n") if "\r" not in text else _LINES.split(text)):
        if not line:
            continue     # the blank line(s) ending the event
        if line[0] == ":":
            ev.comments.append(line[1:])
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
        elif name == "event":
            ev.event = value
        elif name == "id":
            if "\x00" not in value:
                ev.id = value
        elif name == "retry":
            if value.isdigit() and value.isascii():
                ev.retry = int(value)
    if not data:
        return None
    ev.data = "\n".join(data)
    return ev


def format_event(ev: Event) -> bytes:
    """An Event as wire bytes (LF line ends, one `data:` line per line of data)."""
    out = [f":{c}\n" for c in ev.comments]
    if ev.event is not None:
        out.append(f"event: {ev.event}\n")
    if ev.id is not None:
        out.append(f"id: {ev.id}\n")
    if ev.retry is not None:
        out.append(f"retry: {ev.retry}\n")
    for line in _LINES.split(ev.data):
        out.append(f"data: {line}\n")
    out.append("\n")
    return "".join(out).encode("utf-8")
