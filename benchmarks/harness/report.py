"""Medians, ratios and the RESULTS.md / console tables."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field

from .load import Measure


@dataclass
class Cell:
    """All rounds of one (scenario, proxy): measures, or why there are none."""
    runs: list[Measure] = field(default_factory=list)
    error: str | None = None

    def median(self, attr: str) -> float | None:
        values = [getattr(m, attr) for m in self.runs if getattr(m, attr) is not None]
        return statistics.median(values) if values else None

    def spread(self) -> float | None:
        """(max - min) / median of req/s across rounds, in percent."""
        values = [m.rps for m in self.runs]
        if len(values) < 2:
            return None
        return 100.0 * (max(values) - min(values)) / statistics.median(values)

    def errors(self) -> int:
        return sum(m.errors for m in self.runs)


@dataclass
class Table:
    scenario: str
    title: str
    cells: dict[str, Cell]  # row label → cell, in display order
    ratio_base: str         # row the ratio column divides by ("envoy", or "plain route")
    latency_base: str | None = "direct"


def _fmt(value: float | None, spec: str, signed: bool = False) -> str:
    if value is None:
        return "–"
    return format(value, ("+" if signed else "") + spec)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def table_rows(table: Table) -> list[list[str]]:
    base_rps = table.cells.get(table.ratio_base, Cell()).median("rps")
    lat = table.cells.get(table.latency_base or "", Cell())
    rows = []
    for label, cell in table.cells.items():
        if cell.error and not cell.runs:
            rows.append([label, "FAILED", "–", "–", "–", "–", "–", "–", "–"])
            continue
        rps = cell.median("rps")
        p50, p99 = cell.median("p50_ms"), cell.median("p99_ms")
        ratio = rps / base_rps if rps and base_rps else None
        show_added = table.latency_base and label != table.latency_base
        rows.append([
            label, _fmt(rps, ",.0f"), _fmt(ratio, ".2f"),
            _fmt(p50, ".3f"), _fmt(p99, ".3f"),
            _fmt(_diff(p50, lat.median("p50_ms")) if show_added else None, ".3f", True),
            _fmt(_diff(p99, lat.median("p99_ms")) if show_added else None, ".3f", True),
            _fmt(cell.spread(), ".1f"), str(cell.errors()),
        ])
    return rows


def header(table: Table) -> list[str]:
    ratio = "÷ Envoy" if table.ratio_base == "envoy" else f"÷ {table.ratio_base}"
    return ["proxy", "req/s", ratio, "p50 ms", "p99 ms", "+p50 ms", "+p99 ms",
            "spread %", "errors"]


def markdown_table(table: Table) -> str:
    head = header(table)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(table)]
    notes = [_note(label, cell.error) for label, cell in table.cells.items() if cell.error]
    return "\n".join(lines + ([""] + notes if notes else []))


def _note(label: str, error: str) -> str:
    """A bullet; an error of several lines (a log tail) goes in a code block under it."""
    first, _, rest = error.strip().partition("\n")
    block = f"\n\n  ```\n{_indent(rest.strip()[-2000:])}\n  ```" if rest.strip() else ""
    return f"- {label}: {first}{block}"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def console_table(table: Table) -> str:
    rows = [header(table)] + table_rows(table)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [f"\n== {table.scenario}: {table.title}"]
    for row in rows:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    for label, cell in table.cells.items():
        if cell.error:
            out.append(f"  ! {label}: {cell.error.splitlines()[0][:200]}")
    return "\n".join(out)


# --- environment ---------------------------------------------------------------

def _cmd(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"
    return (proc.stdout + proc.stderr).strip()


def _first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text else "unknown"


def _pkg_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(envoy_bin: str, agproxy_bin: str) -> dict[str, str]:
    lscpu = _cmd(["lscpu"])
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
    cpus = re.search(r"^CPU\(s\):\s*(\d+)", lscpu, re.M)
    envoy = re.search(r"version: \S+?/([\d.]+\S*)", _cmd([envoy_bin, "--version"]))
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model.group(1) if model else 'unknown'} ({cpus.group(1) if cpus else '?'} CPUs)",
        "kernel": platform.release(),
        "envoy": envoy.group(1) if envoy else "unavailable",
        "nginx": _first_line(_cmd(["nginx", "-v"])).replace("nginx version: ", ""),
        "haproxy": _first_line(_cmd(["haproxy", "-v"])).split(" - ")[0],
        "python": sys.version.split()[0],
        "uvloop": _pkg_version("uvloop"),
        "agproxy": _first_line(_cmd([agproxy_bin, "version"])),
        "wrk": _first_line(_cmd(["wrk", "-v"])).split(" Copyright")[0],
        "h2load": _first_line(_cmd(["h2load", "--version"])),
        "openssl": _first_line(_cmd(["openssl", "version"])),
    }
