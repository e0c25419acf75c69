"""proxy/: the exchange, the route table and the contracts import each other without a circle.

Every import counts: at a module's top, inside a function (a lazy import that
dodges a cycle at run time is still the cycle), or under `if TYPE_CHECKING:`.
The contracts (proxy/contract.py) import nothing of proxy/ at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[2] / "agproxy" / "proxy"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "agproxy.proxy":
                found.update(f"agproxy.proxy.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m.rsplit(".", 1)[1] for m in found if m.startswith("agproxy.proxy.")}


def test_proxy_modules_import_without_cycles():
    graph = {p.stem: imports(p) for p in PROXY.glob("*.py") if p.stem != "__init__"}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in trail, " -> ".join(trail + (node,))
        for nxt in graph.get(node, ()):
            visit(nxt, trail + (node,))

    for module in graph:
        visit(module, ())
    assert graph["contract"] == set()
