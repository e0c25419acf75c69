"""What a client API and a provider kind need of each other, for one request.

Theory of operation: `parse_client(api, raw)` reads the client's body once
(`ClientRequest`); for each provider tried, `provider_request` gives the path and
the body to send, `client_reply` turns a provider's JSON answer into the client's
API, and `StreamTranslator` does the same for a stream, chunk by chunk.

When the client's API and the provider's wire format are the same (an OpenAI
client and an `openai` / `openai_compatible` provider, an Anthropic client and an
`anthropic` provider) nothing is translated: the body goes out with its `model`
replaced, and the stream's bytes pass on unchanged while the translator reads
only the events that can carry usage (a substring test picks them; the others
are not parsed). The one edit: an OpenAI stream is requested with
`stream_options.include_usage` so that the gateway learns the usage, and when the
client did not ask for it the extra chunk (`choices: []`) is dropped from what
the client sees.

Otherwise the request is parsed into a `Chat` (backends/llm/chat.py) and written
in the provider's format, and the answer or each stream event is decoded into
the neutral form and encoded in the client's. A stream that ends without the
provider's end marker, or breaks, is finished with an error event in the client's
format (`fail`), so an SDK raises instead of taking a cut stream for a whole one.
"""

from __future__ import annotations

from typing import Any

import orjson

from agproxy.backends.llm import anthropic, bedrock, openai
from agproxy.backends.llm.chat import BadRequest, Chat, ProviderError, Reply
from agproxy.backends.llm.usage import Usage, from_openai
from agproxy.http.sse import SseError, SseSplitter, parse as parse_sse

CLIENT_APIS = ("openai", "anthropic")
WIRE = {"openai": "openai", "openai_compatible": "openai", "anthropic": "anthropic", "bedrock": "bedrock"}
PATHS = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


class ClientRequest:
    """A client's request, parsed once; `chat()` translates it lazily (only when a
    provider of another format is tried)."""

    __slots__ = ("api", "body", "model", "stream", "include_usage", "_chat")

    def __init__(self, api: str, body: dict, model: str):
        self.api = api
        self.body = body
        self.model = model
        self.stream = bool(body.get("stream"))
        so = body.get("stream_options")
        self.include_usage = bool(isinstance(so, dict) and so.get("include_usage"))
        self._chat: Chat | None = None

    def chat(self) -> Chat:
        ch = self._chat
        if ch is None:
            ch = self._chat = (openai.parse_request(self.body) if self.api == "openai"
                               else anthropic.parse_request(self.body))
        return ch


def parse_client(api: str, raw: bytes) -> ClientRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the request body is not valid JSON") from None
    model = openai.check_request(body) if api == "openai" else anthropic.check_request(body)
    return ClientRequest(api, body, model)


def provider_request(req: ClientRequest, kind: str, model: str) -> tuple[str, bytes]:
    """(path under the provider's base, JSON body) for `model` on a provider of `kind`."""
    wire = WIRE[kind]
    if wire == req.api:
        body = dict(req.body)
        body["model"] = model
        if wire == "openai" and req.stream and not req.include_usage:
            so = body.get("stream_options")
            body["stream_options"] = {**(so if isinstance(so, dict) else {}), "include_usage": True}
        return PATHS[wire], orjson.dumps(body)
    ch = req.chat()
    if wire == "openai":
        return PATHS["openai"], orjson.dumps(openai.render_request(ch, model, compatible=kind == "openai_compatible"))
    if wire == "anthropic":
        return PATHS["anthropic"], orjson.dumps(anthropic.render_request(ch, model))
    path, body = bedrock.render_request(ch, model)
    return path, orjson.dumps(body)


def parse_provider_reply(kind: str, data: bytes, model: str) -> tuple[Any, Reply]:
    """A provider's JSON answer: (the parsed body, the neutral Reply); ProviderError
    when it is not valid JSON of that API."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError("the provider's answer is not JSON") from None
    wire = WIRE[kind]
    if wire == "openai":
        return body, openai.parse_response(body)
    if wire == "anthropic":
        return body, anthropic.parse_response(body)
    return body, bedrock.parse_response(body, model)


def parse_passthrough_reply(kind: str, data: bytes, model: str) -> tuple[str, Usage | None]:
    """(response model, usage) of a provider's JSON answer that goes to a client of the
    same API unchanged; ProviderError as `parse_provider_reply` gives it."""
    if WIRE[kind] != "openai":
        _, reply = parse_provider_reply(kind, data, model)
        return reply.model, reply.usage
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProviderError("the provider's answer is not JSON") from None
    return openai.check_response(body)


def client_reply(req: ClientRequest, kind: str, body: Any, reply: Reply) -> bytes:
    """The answer as the client's API writes it (the provider's own bytes when the
    formats match: only re-serialised, never re-shaped)."""
    if WIRE[kind] == req.api:
        return orjson.dumps(body)
    if req.api == "openai":
        return orjson.dumps(openai.render_response(reply))
    return orjson.dumps(anthropic.render_response(reply))


def error_reply(api: str, kind: str, message: str) -> bytes:
    """A gateway error in the client's API (kind: invalid_request, not_found,
    too_large, unavailable, upstream, rate_limit, auth)."""
    body = openai.error_body(kind, message) if api == "openai" else anthropic.error_body(kind, message)
    return orjson.dumps(body)


def provider_error(kind: str, body: Any, error_type: str | None = None) -> tuple[str, str] | None:
    """(type, message) of a provider's JSON error body."""
    wire = WIRE[kind]
    if wire == "openai":
        return openai.error_message(body)
    if wire == "anthropic":
        return anthropic.error_message(body)
    return bedrock.error_message(body, error_type)


def _data_of(raw: bytes) -> str | None:
    """The data of one raw SSE event: the usual one-line `data: …` event (LF, no CR)
    read directly, anything else through the parser. What `parse(raw).data` gives."""
    # Slice comparisons, not startswith/endswith: a bytes method call costs ~1.5k
    # instructions of argument parsing, a slice and compare a few hundred (callgrind).
    if raw[:6] == b"data: " and raw[-2:] == b"\n\n" and raw.find(b"\n") == len(raw) - 2 \
            and raw.find(b"\r") < 0:
        return raw[6:-2].decode("utf-8", "replace")
    ev = parse_sse(raw)
    return None if ev is None else ev.data


_NO_JSON = object()


def _marked(chunk: bytes, marker: bytes, lo: int, hi: int, marked: dict, usage: bool) -> None:
    """Each event in chunk[lo:hi] holding `marker` into `marked` (start → (end, the
    marker's index if `usage`, else -1)), last first (a chunk of whole LF events; empty
    lines before an event are not part of it). What
    makes an event of a pass-through OpenAI stream worth parsing once the first token
    came (`_observe` tests the same per event): `"usage":{` and `[DONE]`. Not an error
    event: after the first token it goes on to the client as it came and decides
    nothing (the stream is judged by its end marker), so the gateway does not look."""
    rfind = chunk.rfind
    i = rfind(marker, lo, hi)
    while i >= 0:
        start = rfind(b"\n\n", lo, i)
        if start < 0:
            start = lo
            while chunk[start] == 10:
                start += 1
        else:
            start += 2
        marked[start] = (chunk.find(b"\n\n", i) + 2, i if usage else -1)
        i = rfind(marker, lo, start)


class StreamTranslator:
    """A provider's stream → the client's, one chunk at a time (synchronous, no I/O).

    `feed(chunk)` returns the bytes for the client, `end()` the last ones when the
    provider's stream ended cleanly, `fail(why)` an error event when it did not.
    Afterwards: `usage`, `response_model`, `complete` (the provider's end marker
    was seen), `first_token` (True once content arrived; the caller times it),
    `error` (an error event the provider opened its stream with: before the first
    token; a pass-through OpenAI stream is not searched for one after it).
    """

    __slots__ = ("api", "wire", "passthrough", "drop_usage_chunk", "usage", "response_model", "complete",
                 "first_token", "error", "_split", "_decoder", "_encoder", "_bedrock", "_seen", "_ended")

    def __init__(self, req: ClientRequest, kind: str, model: str):
        self.api = req.api
        self.wire = WIRE[kind]
        self.passthrough = self.wire == req.api
        self.drop_usage_chunk = self.passthrough and self.wire == "openai" and not req.include_usage
        self.usage: Usage | None = None
        self.response_model = model
        self.complete = False
        self.first_token = False
        self.error: str | None = None
        self._bedrock = self.wire == "bedrock"
        self._seen = False          # a pass-through OpenAI stream's first chunk was read
        self._ended = False
        self._split = None if self._bedrock else SseSplitter()
        if self.wire == "openai":
            # (a pass-through reads its events itself: `_read_openai`)
            self._decoder = None if self.passthrough else openai.Decoder()
        elif self.wire == "anthropic":
            self._decoder = anthropic.Decoder()
        else:
            self._decoder = bedrock.Decoder(model)
        if self.passthrough:
            self._encoder = None
        elif req.api == "openai":
            self._encoder = openai.Encoder(model, req.include_usage)
        else:
            self._encoder = anthropic.Encoder(model)

    def _note(self, events: list[tuple]) -> None:
        for ev in events:
            k = ev[0]
            if k == "usage":
                self.usage = ev[1]
            elif k == "text" or k == "tool":
                self.first_token = True
            elif k == "start":
                if ev[2]:
                    self.response_model = ev[2]
            elif k == "done":
                self.complete = True
            elif k == "error":
                self.error = f"{ev[1]}: {ev[2]}"[:200]

    def feed(self, chunk: bytes) -> bytes:
        """The client's bytes for one chunk of the provider's stream; ProviderError when
        the stream is not of the provider's API (an event that is JSON but of another
        shape, `"choices": 5`, is as invalid as one that is not JSON, or one over the
        splitter's bound)."""
        try:
            return self._feed(chunk)
        except (TypeError, AttributeError, KeyError, IndexError) as exc:
            raise ProviderError(f"a malformed stream event ({type(exc).__name__})") from None
        except SseError as exc:
            raise ProviderError(str(exc)) from None

    def _feed(self, chunk: bytes) -> bytes:
        if self._bedrock:
            events = self._decoder.feed(chunk)
            self._note(events)
            return self._encode(events)
        split = self._split
        if self.passthrough:
            if self.wire == "openai" and split.idle and chunk[-2:] == b"\n\n" and chunk.find(b"\r") < 0:
                return self._pass_openai(chunk)
            return self._observe(split.feed(chunk))
        raws = split.feed(chunk)
        out = []
        for raw in raws:
            ev = parse_sse(raw)
            if ev is None:
                continue
            events = self._decoder.feed(ev.data)
            self._note(events)
            out.append(self._encode(events))
        return b"".join(out)

    def _pass_openai(self, chunk: bytes) -> bytes:
        """Pass-through of an OpenAI stream, for a chunk of whole events (nothing carried
        over, LF line ends, ending with a blank line): what `_observe` does, without
        splitting the chunk into events. The events before the first token are read one
        by one (the model, an opening error, garbage), except that once the opening
        event was parsed, an event whose bytes hold a non-empty `"content":"` is known
        to be the first token without parsing it (the key cannot occur inside a JSON
        string: its quotes would be escaped). After that, only the events holding a
        marker `_observe` would parse (`"usage":{`, `[DONE]`) are found, by one
        backward scan of the chunk per marker, and parsed. The chunk goes on as it came,
        less a usage chunk the client did not ask for.

        Why: split into events, a 2.6 KB answer of 9 events cost ~31 µs of the gateway's
        CPU per request against ~80 for everything else on the route (benchmarks/
        llm_bench.py's stream, translator on vs a no-op); the scans are C loops over the
        bytes, the per-event Python work is what cost. Backward (`rfind`) because the
        usage chunk and the end marker close a stream, and because CPython's `rfind` of
        these markers is ~2.5x faster than its `find` (0.34 against 0.83 µs over 1.7 KB
        with no match); the first token by its bytes saves a parse (~1.2 µs)."""
        find = chunk.find
        n = len(chunk)
        pos = 0
        known = -1      # the first-token event's start, when it was known by its bytes (not parsed)
        drops: list[tuple[int, int]] = []
        while not self.first_token and pos < n:
            if chunk[pos] == 10:    # an empty line (dispatches nothing): never part of an event
                pos += 1
                continue
            end = find(b"\n\n", pos) + 2
            if end < 2:     # only the LF of an empty line is left: it dispatches nothing
                break
            if self._seen and (c := find(b'"content":"', pos, end)) >= 0 and chunk[c + 11] != 34:
                self.first_token = True
                known = pos
            elif self._read_event(chunk[pos:end]):
                drops.append((pos, end))
            pos = end
        lo = pos if known < 0 else known    # (an unparsed first-token event may carry a usage too)
        if lo < n:
            marked: dict[int, tuple[int, int]] = {}     # event start → (end, usage marker's index or -1)
            top = n
            done_at = n - 14
            if chunk[done_at:] == b"data: [DONE]\n\n" and (
                    done_at == pos or (done_at > pos and chunk[done_at - 2:done_at] == b"\n\n")):
                # The end marker closes the chunk (a whole answer in one read, or a
                # stream's last read): read it there instead of scanning for it.
                self.complete = True
                top = done_at
            else:
                _marked(chunk, b"[DONE]", lo, n, marked, False)
            _marked(chunk, b'"usage":{', lo, top, marked, True)
            for start in (sorted(marked) if len(marked) > 1 else marked):
                end, at = marked[start]
                if self._read_usage(chunk, start, end, at) if at >= 0 else self._read_event(chunk[start:end]):
                    drops.append((start, end))
        if not drops:
            return chunk
        out = []
        at = 0
        for start, end in drops:
            out.append(chunk[at:start])
            at = end
        out.append(chunk[at:])
        return b"".join(out)

    def _read_usage(self, chunk: bytes, start: int, end: int, at: int) -> bool:
        """`_read_event` of the event chunk[start:end] whose `"usage":{` is at `at`, once
        the first token came. As OpenAI writes it, a one-line event whose last member is
        the usage (`…,"choices":[],"usage":{…}}`): then only the usage object is parsed
        (the slice up to the event's closing brace parses as one JSON value only if the
        usage is that last top-level member), and `"choices":[],` just before it is the
        chunk to drop. Anything else is read whole. (-2.4k instructions of the ~10k a
        whole usage event cost, callgrind.)"""
        if chunk[end - 4:end] == b"}}\n\n" and chunk[start:start + 6] == b"data: " \
                and chunk.find(b"\n", start, end - 2) < 0:
            try:
                u = orjson.loads(chunk[at + 8:end - 3])
            except orjson.JSONDecodeError:
                u = None
            if u.__class__ is dict:
                if not u:
                    return False
                if not self.drop_usage_chunk:
                    self.usage = from_openai(u)
                    return False
                if chunk[at - 13:at] == b'"choices":[],':
                    self.usage = from_openai(u)
                    return True
        return self._read_event(chunk[start:end])

    def _read_event(self, raw: bytes) -> bool:
        """Parse one raw event of a pass-through stream and note what it says; True when
        it is the usage chunk the client did not ask for (to be dropped)."""
        if self.wire == "openai":
            return self._read_openai(raw)
        data = _data_of(raw)
        if data is not None:
            self._note(self._decoder.feed(data))
        return False

    def _read_openai(self, raw: bytes) -> bool:
        """What openai.Decoder and `_note` make of one event, read straight off the parsed
        chunk (no event tuples: a pass-through needs only the model, the first token, the
        usage, the end marker and errors)."""
        if raw == b"data: [DONE]\n\n":
            self.complete = True
            return False
        chunk = _NO_JSON
        if raw[:6] == b"data: ":
            # The usual one-line event: its data parsed in place (orjson skips the blank
            # line as JSON whitespace). Anything else (more lines, invalid UTF-8, not
            # JSON) takes the parser's path, which reads the event as the SSE rules say.
            try:
                chunk = orjson.loads(raw[6:])
            except orjson.JSONDecodeError:
                pass
        if chunk is _NO_JSON:
            data = _data_of(raw)
            if data is None:
                return False
            if data == "[DONE]":
                self.complete = True
                return False
            chunk = openai.load_chunk(data)
        elif not isinstance(chunk, dict):
            raise ProviderError("an OpenAI stream event is not an object")
        err = openai.error_message(chunk) if "error" in chunk else None
        if err is not None:
            self.error = f"{err[0]}: {err[1]}"[:200]
            return False
        if not self._seen:
            self._seen = True
            model = chunk.get("model")
            if model:
                self.response_model = str(model)
        choices = chunk.get("choices")
        for choice in choices or ():
            d = choice.get("delta") or {}
            if d.get("content"):
                self.first_token = True
            for tc in d.get("tool_calls") or ():
                if tc.get("id"):
                    self.first_token = True
        u = chunk.get("usage")
        if u:
            self.usage = from_openai(u)
            return self.drop_usage_chunk and choices == []
        return False

    def _observe(self, raws: list[bytes]) -> bytes:
        """Pass-through: parse only the events that can carry what we need.

        `raw.find(x) >= 0`, not `x in raw`: CPython's bytes `in` first tries its operand
        as an integer and builds (then clears) a TypeError for a bytes one, ~1.9k
        instructions each time; callgrind on h1-llm-stream (10 events): ~50k of the
        request's instructions went to these tests."""
        keep = []
        drop = False
        openai_wire = self.wire == "openai"
        for raw in raws:
            if openai_wire:
                if not self.first_token:
                    interesting = True
                elif raw[-15:] == b'"usage":null}\n\n':
                    # A content chunk as OpenAI writes it under include_usage (which the
                    # gateway asks for): no usage, no end marker, no error. One slice
                    # compare instead of three scans (each bytes method call ~1.5k
                    # instructions, a slice compare a few hundred).
                    interesting = False
                elif raw == b"data: [DONE]\n\n":
                    interesting = True
                else:
                    find = raw.find
                    interesting = find(b'"usage":{') >= 0 or find(b"[DONE]") >= 0
            else:
                head = raw[:40]
                interesting = not self.first_token or head.find(b"message_") >= 0 or head.find(b"error") >= 0
            if interesting and self._read_event(raw):
                drop = True
                if raw[:1] == b"\n":
                    keep.append(b"\n")    # the LF of a CRLF cut from its CR: not the dropped event's
                continue
            keep.append(raw)
        if not drop and len(keep) == len(raws):
            return b"".join(raws)
        return b"".join(keep)

    def _encode(self, events: list[tuple]) -> bytes:
        enc = self._encoder
        if enc is None or not events:
            return b""
        return b"".join(enc.feed(ev) for ev in events if ev[0] != "done")

    def end(self) -> bytes:
        """The provider's stream ended (EOF). Its remainder, then the client's ending;
        an error event instead when the provider's end marker never came. Once: a
        second call (the stream's reader finding EOF again) gives b""."""
        if self._ended:
            return b""
        self._ended = True
        out = b""
        if self._bedrock:
            events = self._decoder.end()
            self._note(events)
        else:
            rest = self._split.end()   # an unterminated last event: a client discards it too
            if self.passthrough and rest and not rest.strip(b"\r\n"):
                out = rest      # only line ends (the LF of a CRLF cut from its CR): passed on as they came
        if not self.complete:
            return out + self.fail("the provider's stream ended before its end marker")
        if self._encoder is not None:
            out += self._encoder.finish()
        return out

    def fail(self, why: str) -> bytes:
        """An error event in the client's API: the stream broke after it began."""
        self.error = self.error or why
        if self.api == "openai":
            return b"data: " + orjson.dumps(openai.error_body("upstream", why)) + b"\n\n"
        return (b"event: error\ndata: " + orjson.dumps(anthropic.error_body("upstream", why)) + b"\n\n")
