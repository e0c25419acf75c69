"""The per-request variables (``Activation``) and what the library receives of them.

Providers are called lazily, at most once; per projection, the library gets a
pruned plain dict, cached for every later expression the same projection covers
(see the package docstring, "Per request").
"""

from __future__ import annotations

from typing import Callable, Iterable

from agproxy.cel.environment import CelEvalError
from agproxy.cel.lexer import _intern, _Projection, _whole

_MISSING = object()
_dict_get = dict.get


def _prune(value: dict, fields: tuple) -> dict:
    """{f: value[f]} for the fields of a projection plan present in value; a field
    with keys is itself pruned to those keys when it is a dict."""
    view = {}
    for f, keys in fields:
        v = _dict_get(value, f, _MISSING)
        if v is _MISSING:
            continue
        if keys is not None and isinstance(v, dict):
            sub = {}
            for k in keys:
                x = _dict_get(v, k, _MISSING)
                if x is not _MISSING:
                    sub[k] = x
            v = sub
        view[f] = v
    return view


_EMPTY = _intern({})


def _bound(data: dict) -> dict:
    """What the library is given for one projection: the pruned plain dict, which
    `program.eval(data=...)` converts at each evaluation. A native
    `env.Activation(data)` converts once but costs ~18k instructions to build
    (callgrind), more than converting a pruned dict the few times a request
    evaluates it. (A seam for tests, which record what the library receives.)"""
    return data


class Activation:
    """Lazily built variables.  Built per request by the proxy layer.

    ``providers`` maps a variable name to a zero-argument function producing its
    plain Python value (a provider returning ``None`` gives an empty map).  A
    provider is called at most once, and only if an evaluated expression references
    that variable.  A variable without provider is an empty map.  A provider that
    raises makes the evaluation raise CelEvalError (and is called again by the next
    expression that needs it).

    The library only receives the part of each value that the evaluated expression
    reads (its projection, see the module docstring); the library activations are
    cached per projection and shared by every expression they cover.

    ``preload`` (optional) names variables to materialize, whole, together with the
    first ones an evaluation needs: the library's activation built then covers every
    later expression that reads only those variables (and the first one's), instead
    of one being built per newly needed projection (a few µs each), at the price of
    converting all of each preloaded variable when it is read.  Their providers are
    then called even if no evaluated expression needs them.
    """

    __slots__ = ("_providers", "_values", "_natives", "_native", "_preload")

    def __init__(self, providers: dict[str, Callable[[], object]] | None = None,
                 preload: Iterable[str] = ()):
        self._providers = providers or {}
        self._values: dict[str, object] = {}      # full provider values
        self._natives: dict = {}                  # _Projection -> what the library gets (_bound)
        self._native = None                       # the one built last
        self._preload = _whole(preload) if preload else None

    def set_provider(self, name: str, provider: Callable[[], object]) -> None:
        """Add or replace one provider (e.g. ``response`` once the response head is
        known), keeping every other variable already materialized."""
        self._providers = {**self._providers, name: provider}
        if name in self._values:
            del self._values[name]
            self._natives = {p: n for p, n in self._natives.items() if name not in p.names}
            self._native = None

    def _native_for(self, projection: _Projection):
        """A library activation holding at least what projection reads (materializing
        the variables it needs)."""
        natives = self._natives
        native = natives.get(projection)
        if native is not None:
            return native
        if projection is _EMPTY:
            return None        # reads no variable: the library needs no activation
        if natives:
            for p, native in natives.items():
                if p.covers(projection):
                    natives[projection] = native   # (the loop ends here)
                    return native
        build = projection
        if self._preload is not None:
            build = build.union(self._preload)
            self._preload = None
        values = self._values
        data = {}
        for name, fields in build.plan:
            value = values.get(name, _MISSING)
            if value is _MISSING:
                value = self._materialize(name)
            if fields is not None and isinstance(value, dict):
                value = _prune(value, fields)
            data[name] = value
        native = _bound(data)
        natives[projection] = native
        if build is not projection:
            natives[build] = native
        self._native = native
        return native

    def _materialize(self, name: str):
        """The full value of variable name (calling its provider once)."""
        provider = self._providers.get(name)
        if provider is None:
            value = {}
        else:
            try:
                value = provider()
            except Exception as exc:
                raise CelEvalError(f"building CEL variable {name!r}: {exc!r}") from exc
            if value is None:
                value = {}
        self._values[name] = value
        return value
