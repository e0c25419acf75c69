"""CEL library benchmark: which Python CEL implementation backs agproxy/cel/.

    .venv/bin/python benchmarks/cel_bench.py [--quick]

Compares, for agproxy's use (compile once at load, evaluate per request with a fresh
activation built from the request's headers and JWT claims):

  cel-python                   pip `cel-python`, import `celpy` (pure Python)
  common-expression-language   pip `common-expression-language`, import `cel` (Rust, PyO3)
  cel-expr-python              pip `cel-expr-python`, import `cel_expr_python` (cel-cpp, pybind11)
  agproxy.cel                  our wrapper over the chosen library (lazy Activation,
                               error check, conversion to plain Python)

The benchmark-only libraries are not runtime dependencies; install them into the
venv to run this (`pip install cel-python common-expression-language`).  A library
that is not installed is skipped.

Measured (µs of CPU time per call, best of interleaved rounds of calibrated loops):
  eval 1 rule    evaluate `jwt.sub != ""` on an activation already built and used
  request 1 rule build the activation from a fresh request, evaluate 1 rule
  request 4 rules build the activation, evaluate the 4 rules below
  activation     request-1-rule minus eval-1-rule: what building the activation costs,
                 including any conversion the library defers to the first access

Each "request" uses different dict objects (a pool of 64 distinct requests), so
nothing can be cached across requests by object identity.  Prints a markdown
section (machine, versions, table, error behaviour) on stdout.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import logging
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

RULE_1 = 'jwt.sub != ""'
RULES_4 = [
    'jwt.sub != ""',
    '"contractor" in jwt.groups',
    'request.headers["x-tenant"] == jwt.tenant_id',
    'jwt.groups.join(",")',
]

# Error-behaviour probes: (label, expression).
ERROR_CASES = [
    ("missing map key", 'jwt.role == "admin"'),
    ("int vs double (dyn claim)", "jwt.exp == 1700000000.0"),
    ("int vs double (literals)", "1 == 1.0"),
    ("undeclared variable", 'nope.x == "a"'),
]


def make_requests(n: int = 64) -> list[tuple[dict, dict]]:
    """n distinct (request, jwt) pairs: 10 headers, typical claims."""
    out = []
    for i in range(n):
        headers = {
            "host": "gateway.example.com",
            "user-agent": "agent-sdk/1.4 python/3.11",
            "accept": "application/json",
            "content-type": "application/json",
            "content-length": str(200 + i),
            "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.payload.sig%d" % i,
            "x-request-id": "req-%08d" % i,
            "x-tenant": "tenant-%d" % (i % 4),
            "x-conversation": "conv-%d" % i,
            "traceparent": "00-%032x-%016x-01" % (i, i),
        }
        request = {"method": "POST", "path": "/invocations", "host": "gateway.example.com",
                   "scheme": "https", "headers": headers, "query": {}}
        jwt = {
            "iss": "https://idp.example.com",
            "sub": "user-%d" % i,
            "aud": "agents",
            "exp": 1_700_000_000 + i,
            "iat": 1_699_990_000 + i,
            "tenant_id": "tenant-%d" % (i % 4),
            "groups": ["engineering", "contractor", "oncall"],
            "scope": "agents:invoke",
        }
        out.append((request, jwt))
    return out


# --------------------------------------------------------------------------------
# Adapters: compile(src) -> program; activation(request, jwt) -> act;
# evaluate(program, act) -> value
# --------------------------------------------------------------------------------

class CelPython:
    name = "cel-python"
    dist = "cel-python"

    def __init__(self):
        logging.disable(logging.CRITICAL)   # celpy logs every evaluation error
        import celpy
        from celpy import celtypes
        self.celpy = celpy
        self.env = celpy.Environment()

        def join(lst, sep=celtypes.StringType("")):
            return celtypes.StringType(str(sep).join(str(x) for x in lst))
        self.functions = {"join": join}

    def compile(self, src):
        return self.env.program(self.env.compile(src), functions=self.functions)

    def activation(self, request, jwt):
        j = self.celpy.json_to_cel
        return {"request": j(request), "jwt": j(jwt)}

    def evaluate(self, program, act):
        return program.evaluate(act)


class CommonExpressionLanguage:
    name = "common-expression-language"
    dist = "common-expression-language"

    def __init__(self):
        import cel
        self.cel = cel
        self.functions = {"join": lambda lst, sep="": sep.join(lst)}

    def compile(self, src):
        return self.cel.compile(src)

    def activation(self, request, jwt):
        return self.cel.Context(variables={"request": request, "jwt": jwt}, functions=self.functions)

    def evaluate(self, program, act):
        return program.execute(act)


class CelExprPython:
    name = "cel-expr-python"
    dist = "cel-expr-python"

    def __init__(self):
        from cel_expr_python import cel
        from cel_expr_python.ext import ext_strings
        self.cel = cel
        m = cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
        self.env = cel.NewEnv(variables={"request": m, "jwt": m},
                              extensions=[ext_strings.ExtStrings()])

    def compile(self, src):
        return self.env.compile(src)

    def activation(self, request, jwt):
        return self.env.Activation({"request": request, "jwt": jwt})

    def evaluate(self, program, act):
        # the raw library: the caller must still check result.type() for ERROR
        return program.eval(act).plain_value()


class AgproxyCel:
    name = "agproxy.cel (wrapper)"
    dist = "cel-expr-python"

    def __init__(self):
        from agproxy import cel
        self.cel = cel

    def compile(self, src):
        return self.cel.compile_expression(src)

    def activation(self, request, jwt):
        return self.cel.Activation({"request": lambda: request, "jwt": lambda: jwt})

    def evaluate(self, program, act):
        return program.evaluate(act)


class AgproxyCelPreload(AgproxyCel):
    name = "agproxy.cel, preload=(jwt, request)"

    def activation(self, request, jwt):
        return self.cel.Activation({"request": lambda: request, "jwt": lambda: jwt},
                                   preload=("request", "jwt"))


ADAPTERS = [CelPython, CommonExpressionLanguage, CelExprPython, AgproxyCel, AgproxyCelPreload]


# --------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------

def calibrate(fn, target: float) -> int:
    """How many calls of fn(i) take about `target` seconds."""
    number = 1
    while True:
        t0 = time.process_time()
        for i in range(number):
            fn(i)
        elapsed = time.process_time() - t0
        if elapsed >= target / 4 or number >= 1 << 22:
            return max(1, int(number * target / max(elapsed, 1e-9)))
        number *= 4


def cases(adapter, requests) -> dict:
    """The measured functions of one adapter: name -> fn(i)."""
    n = len(requests)
    rule1 = adapter.compile(RULE_1)
    rules4 = [adapter.compile(s) for s in RULES_4]
    ev = adapter.evaluate
    mk = adapter.activation

    # sanity: the 4 rules give the expected answers
    req, jwt = requests[0]
    act = mk(req, jwt)
    got = [ev(p, act) for p in rules4]
    assert [bool(got[0]), bool(got[1]), bool(got[2]), str(got[3])] == \
        [True, True, True, "engineering,contractor,oncall"], (adapter.name, got)

    warm = mk(req, jwt)
    ev(rule1, warm)

    def eval1(i):
        ev(rule1, warm)

    def request_1(i):
        r, j = requests[i % n]
        ev(rule1, mk(r, j))

    def request_4(i):
        r, j = requests[i % n]
        a = mk(r, j)
        for p in rules4:
            ev(p, a)

    def build_only(i):
        r, j = requests[i % n]
        mk(r, j)

    return {"eval1": eval1, "req1": request_1, "req4": request_4, "build": build_only}


def measure_all(adapters, requests, rounds: int, target: float) -> dict:
    """Best µs per call for each (adapter, case), measured in interleaved rounds.

    CPU time of this process (time.process_time), not wall time, and the best of
    `rounds` short loops, interleaved across libraries: this machine is shared, and
    other processes' load then inflates all libraries alike and mostly not at all.
    """
    fns = {(a.name, k): f for a in adapters for k, f in cases(a, requests).items()}
    numbers = {key: calibrate(f, target) for key, f in fns.items()}
    best = {key: float("inf") for key in fns}
    for _ in range(rounds):
        for key, f in fns.items():
            number = numbers[key]
            t0 = time.process_time()
            for i in range(number):
                f(i)
            best[key] = min(best[key], (time.process_time() - t0) / number)
    out = {}
    for a in adapters:
        m = {k: best[(a.name, k)] * 1e6 for k in ("eval1", "req1", "req4", "build")}
        m["activation"] = max(m["req1"] - m["eval1"], 0.0)
        out[a.name] = m
    return out


# --------------------------------------------------------------------------------
# Error behaviour
# --------------------------------------------------------------------------------

def describe(adapter, src: str) -> str:
    jwt = {"sub": "alice", "exp": 1_700_000_000, "groups": []}
    try:
        program = adapter.compile(src)
    except Exception as exc:
        return f"compile error ({type(exc).__name__})"
    try:
        if isinstance(adapter, CelExprPython):
            result = program.eval(adapter.activation({"headers": {}}, jwt))
            if result.type() == adapter.cel.Type.ERROR:
                return f"returns ERROR value (`.value()` is a truthy str: {str(result.value())[:40]!r})"
            return f"returns {result.plain_value()!r}"
        value = adapter.evaluate(program, adapter.activation({"headers": {}}, jwt))
        return f"returns {value!r}"
    except Exception as exc:
        return f"raises {type(exc).__name__} at eval"


# --------------------------------------------------------------------------------

def machine() -> str:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"nproc={os.cpu_count()}, CPU: {model}, Python {platform.python_version()}"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter loops (noisier)")
    args = ap.parse_args()
    rounds, target = (3, 0.02) if args.quick else (15, 0.05)
    requests = make_requests()

    adapters = []
    for cls in ADAPTERS:
        try:
            adapters.append(cls())
        except ImportError as exc:
            print(f"<!-- skipped {cls.name}: {exc} -->", file=sys.stderr)

    print(f"## Run {datetime.date.today().isoformat()}\n")
    print(f"Machine: {machine()}\n")
    print("Rules: 1 rule = `" + RULE_1 + "`; 4 rules = " +
          ", ".join(f"`{r}`" for r in RULES_4) + ". Activation: request (10 headers) + 8 JWT claims.\n")
    print("| library | version | µs/eval, 1 rule (warm activation) | µs/request, 1 rule | "
          "µs/request, 4 rules | activation µs (incl. deferred conversion) | constructor only µs |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = measure_all(adapters, requests, rounds, target)
    for a in adapters:
        m = results[a.name]
        print(f"| {a.name} | {version(a.dist)} | {m['eval1']:.2f} | {m['req1']:.2f} | "
              f"{m['req4']:.2f} | {m['activation']:.2f} | {m['build']:.2f} |", flush=True)

    print("\nError behaviour (raw library calls; agproxy.cel turns every evaluation error "
          "into CelEvalError):\n")
    print("| library | " + " | ".join(f"{label} `{src}`" for label, src in ERROR_CASES) + " |")
    print("|---|" + "---|" * len(ERROR_CASES))
    for a in adapters:
        if isinstance(a, AgproxyCel):
            continue
        print(f"| {a.name} | " + " | ".join(describe(a, src) for _, src in ERROR_CASES) + " |")


if __name__ == "__main__":
    main()
