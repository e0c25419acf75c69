"""The layering arrows DESIGN.md states, checked over the import graph of agproxy/.

Every import counts: module level, function-local, under `if TYPE_CHECKING:`, absolute
or relative. A broken arrow fails with the file, line and import that breaks it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "agproxy"

# layer → the layers it must never import (DESIGN.md, "Layout").
FORBIDDEN = {
    "http": {"filters", "backends", "proxy"},
    "server": {"filters", "backends", "proxy"},
    "upstream": {"filters", "backends", "proxy"},
    "identity": {"proxy", "backends", "filters", "server"},
    "filters": {"server"},
    "mcp": {"proxy", "filters", "backends", "server", "upstream"},   # a protocol library
    "backends": {"server"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, relative ones resolved."""
    out = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "agproxy":     # `from agproxy import proxy`: the subpackages
                out.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
            else:
                out.append((node.lineno, target))
    return out


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "agproxy" else None


def graph() -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every agproxy-internal import."""
    edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for line, target in imports_of(path.read_text(), mod, path.name == "__init__.py"):
            if target.startswith("agproxy"):
                edges.append((str(path.relative_to(PACKAGE.parent)), line, target))
    return edges


def test_the_checker_sees_local_relative_and_type_checking_imports():
    src = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from agproxy.proxy.route import Match\n"
        "def f():\n"
        "    from ..backends import relay\n"
        "    import agproxy.filters.jwt\n"
        "    from agproxy import server\n"
    )
    found = [layer_of(t) for _, t in imports_of(src, "agproxy.identity.token_exchange")]
    assert {"proxy", "backends", "filters", "server"} <= set(found)


def test_layering_arrows_hold():
    edges = graph()
    assert len({f for f, _, _ in edges}) > 30            # the walk did see the package
    broken = []
    for file, line, target in edges:
        src, dst = layer_of(module_name(PACKAGE.parent / file)), layer_of(target)
        if dst in FORBIDDEN.get(src, ()):
            broken.append(f"{file}:{line}: {src}/ imports {target}")
    assert not broken, "layering arrows broken (DESIGN.md):\n" + "\n".join(broken)


def test_only_config_reads_toml():
    readers = sorted({file for path in PACKAGE.rglob("*.py")
                      for file in [str(path.relative_to(PACKAGE.parent))]
                      for _, target in imports_of(path.read_text(), module_name(path))
                      if target.split(".")[0] == "tomllib" and not file.startswith("agproxy/config/")})
    assert not readers, f"only config/ reads TOML: {readers}"
