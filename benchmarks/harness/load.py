"""Load generators (pinned to the load core) and the parsing of what they print.

- wrk: HTTP/1.1 keep-alive, closed loop, 64 connections, 1 thread;
  req/s and p50/p99 from its ``--latency`` distribution.
- h2load: HTTP/2 (h2c prior knowledge, or h2 over TLS via ALPN), 16 connections
  × 10 concurrent streams, 1 thread; p50/p99 from its per-request ``--log-file``.
- h2load --rps: fixed rate (each of 10 HTTP/1.1 connections sends 100 req/s,
  connections staggered by 1 ms → one request every ms); p50/p99 from the
  per-request log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .procs import Supervisor

WRK_CONNECTIONS = 64
H2_CLIENTS, H2_STREAMS = 16, 10
RATE_CLIENTS, RATE_TOTAL = 10, 1000


@dataclass
class Measure:
    rps: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0  # failed requests + non-2xx answers
    done: int = 0        # h2load: requests answered (any status)
    data_bytes: int = 0  # h2load: response body bytes received in all


class LoadError(RuntimeError):
    pass


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_latency_ms(output: str, pct: str) -> float | None:
    match = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.M)
    return float(match.group(1)) * _UNITS_MS[match.group(2)] if match else None


def parse_wrk(output: str) -> Measure:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise LoadError("wrk printed no Requests/sec: " + _tail(output))
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return Measure(float(rps.group(1)), _wrk_latency_ms(output, "50"),
                   _wrk_latency_ms(output, "99"), errors)


def parse_h2load(output: str) -> Measure:
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", output)
    reqs = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored, (\d+) timeout", output)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if not (rps and reqs and codes):
        raise LoadError("h2load output not understood: " + _h2load_summary(output))
    errors = int(reqs.group(5)) + sum(int(codes.group(i)) for i in (2, 3, 4))
    if int(reqs.group(4)) == 0:
        raise LoadError("no request succeeded: " + _h2load_summary(output))
    data = re.search(r"^traffic: .*, \S+ \((\d+)\) data$", output, re.M)
    return Measure(float(rps.group(1)), errors=errors, done=int(reqs.group(3)),
                   data_bytes=int(data.group(1)) if data else 0)


def percentiles_from_log(path: Path) -> tuple[float | None, float | None]:
    """p50/p99 in ms of the successful requests in an h2load --log-file.

    h2load logs only the measured part (not --warm-up-time): checked with 1.52."""
    durations = []
    with open(path) as log:
        for line in log:
            cols = line.split("\t")
            if len(cols) >= 3 and cols[1] != "-1":
                durations.append(int(cols[2]))
    if not durations:
        return None, None
    durations.sort()

    def pct(p: float) -> float:
        return durations[min(len(durations) - 1, int(p * len(durations)))] / 1000.0
    return pct(0.50), pct(0.99)


@dataclass
class LoadGen:
    """Runs one measurement at a time on `core`, bounded by duration + slack."""
    sup: Supervisor
    workdir: Path
    core: int
    duration: float
    warm_up: float

    def _run(self, argv: list[str], run_for: float) -> str:
        code, output = self.sup.run("load", argv, self.core, timeout=run_for + 30)
        if code != 0:
            raise LoadError(f"{argv[0]} exited {code}: " + _tail(output))
        return output

    def _headers(self, headers: dict[str, str] | None) -> list[str]:
        return [arg for k, v in (headers or {}).items() for arg in ("-H", f"{k}: {v}")]

    def wrk(self, url: str, headers: dict | None = None) -> Measure:
        """HTTP/1.1 keep-alive, plaintext or TLS (by the URL scheme)."""
        common = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", *self._headers(headers)]
        if self.warm_up > 0:
            self._run([*common, f"-d{self.warm_up:g}s", url], self.warm_up)
        output = self._run([*common, f"-d{self.duration:g}s", "--latency", url], self.duration)
        return parse_wrk(output)

    def _h2load(self, flags: list[str], url: str, headers: dict | None, run_for: float) -> Measure:
        log = self.workdir / "h2load-requests.log"
        log.unlink(missing_ok=True)
        argv = ["h2load", "-t1", *flags, "--log-file", str(log), *self._headers(headers), url]
        measure = parse_h2load(self._run(argv, run_for))
        measure.p50_ms, measure.p99_ms = percentiles_from_log(log)
        log.unlink(missing_ok=True)
        return measure

    def h2(self, url: str, headers: dict | None = None) -> Measure:
        """HTTP/2: h2c prior knowledge for http://, ALPN h2 for https://."""
        timing = ["-D", f"{self.duration:g}", "--warm-up-time", f"{max(self.warm_up, 0.1):g}"]
        return self._h2load([f"-c{H2_CLIENTS}", f"-m{H2_STREAMS}", *timing], url, headers,
                            self.duration + self.warm_up)

    def fixed_rate(self, url: str, headers: dict | None = None, rate: int = RATE_TOTAL,
                   extra: tuple[str, ...] = ()) -> Measure:
        """HTTP/1.1 at `rate` req/s in all (RATE_TOTAL), over RATE_CLIENTS connections
        (fewer below 10 req/s; `extra`: more h2load flags, e.g. ``-d body``).

        `--rps` alone fires every connection's timer at the same instant (bursts
        of RATE_CLIENTS requests); `-r1 --rate-period` starts the connections
        staggered so requests arrive evenly spaced. `-r` excludes `-D`, so the
        runs are counted in requests, and the warm-up is a run of its own."""
        clients = max(1, min(RATE_CLIENTS, rate))
        rate = clients * max(1, rate // clients)
        stagger = ["-r1", f"--rate-period={1000 / rate:g}ms"]
        flags = ["--h1", f"-c{clients}", f"--rps={rate // clients}", *stagger, *extra]
        if self.warm_up > 0:
            self._h2load([*flags, f"-n{max(clients, int(rate * self.warm_up))}"], url, headers,
                         self.warm_up)
        return self._h2load([*flags, f"-n{max(clients, int(rate * self.duration))}"], url, headers,
                            self.duration)

    def h1_closed(self, url: str, headers: dict | None = None, clients: int = 16,
                  extra: tuple[str, ...] = ()) -> Measure:
        """HTTP/1.1 closed loop with h2load (`clients` keep-alive connections, one
        request at a time each): what wrk does, for requests with a body (``-d``)."""
        # h2load takes whole seconds, or a unit: "500ms"
        timing = ["-D", f"{self.duration:g}", "--warm-up-time", f"{int(max(self.warm_up, 0.1) * 1000)}ms"]
        return self._h2load(["--h1", f"-c{clients}", *timing, *extra], url, headers,
                            self.duration + self.warm_up)

    def smoke(self, url: str, http1: bool, headers: dict | None = None) -> str | None:
        """20 requests; None if all got a 2xx, else what went wrong."""
        argv = ["h2load", "-n20", "-c1", "-N3s", *(["--h1"] if http1 else []),
                *self._headers(headers), url]
        code, output = self.sup.run("smoke", argv, self.core, timeout=15)
        if code == -1:
            return "smoke test timed out (no answer in 15 s)"
        try:
            measure = parse_h2load(output)
        except LoadError as exc:
            return f"smoke test: {exc}"
        if code != 0 or measure.errors:
            return f"smoke test: h2load exit {code}, {measure.errors} errors: {_h2load_summary(output)}"
        return None


def _tail(output: str, chars: int = 300) -> str:
    """The end of a tool's output on one line, for tables and logs."""
    return " | ".join(line.strip() for line in output.strip()[-chars:].splitlines() if line.strip())


_H2LOAD_KEY_LINES = re.compile(
    r"requests:|status codes:|protocol|error|fail|refused|timeout|reset", re.I)


def _h2load_summary(output: str) -> str:
    """The lines of an h2load report that say what went wrong, on one line."""
    lines = [line.strip() for line in output.splitlines()
             if _H2LOAD_KEY_LINES.search(line) and not line.lstrip().startswith("time for")]
    return " | ".join(lines[-6:]) or _tail(output)
