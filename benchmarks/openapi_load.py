#!/usr/bin/env python3
"""How long an `openapi_mcp` backend takes to load a big spec (issue 10: "a 500-operation
spec loads in well under a second").

    .venv/bin/python benchmarks/openapi_load.py [--operations 500] [--repeat 5]

Builds a spec of N operations (N/2 paths, each a GET with a path parameter and a shared
`$ref` query parameter, and a PUT whose JSON body is a shared recursive schema), then
times `ToolSet.load` on its JSON and YAML text: parsing, `$ref` resolution, tool naming
and the compiled argument validators. Prints the best and the median of the repeats.
Wall-clock, so run it on a quiet machine; the suite checks only that such a spec loads
(tests/unit/test_mcp_openapi.py), never how fast.
"""

from __future__ import annotations

import argparse
import statistics
import time

import orjson
import yaml

from agproxy.mcp.openapi import ToolSet


def big_spec(operations: int) -> dict:
    paths = {}
    for i in range(operations // 2):
        paths[f"/r{i}/{{id}}"] = {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
            "get": {"operationId": f"get{i}", "parameters": [{"$ref": "#/components/parameters/Q"}]},
            "put": {"operationId": f"put{i}", "requestBody": {"content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/Node"}}}}},
        }
    components = {
        "parameters": {"Q": {"name": "q", "in": "query", "schema": {"type": "string"}}},
        "schemas": {"Node": {"type": "object", "properties": {
            "name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
            "meta": {"$ref": "#/components/schemas/Meta"}}},
            "Meta": {"type": "object", "properties": {"k": {"type": "string"}}}}}
    return {"openapi": "3.1.0", "info": {"title": "big", "version": "1"}, "paths": paths, "components": components}


def timed(text: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        ToolSet.load(spec_text=text)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    spec = big_spec(args.operations)
    for name, text in (("JSON", orjson.dumps(spec).decode()), ("YAML", yaml.safe_dump(spec))):
        times = timed(text, args.repeat)
        print(f"{args.operations} operations from {name}: best {min(times) * 1000:.1f} ms, "
              f"median {statistics.median(times) * 1000:.1f} ms ({args.repeat} loads)")


if __name__ == "__main__":
    main()
