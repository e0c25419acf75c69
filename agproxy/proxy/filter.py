"""The filter contract's old home: the names are re-exported from proxy/contract.py.

The contract (Filter, LocalReply, Response, BodyHook, RouteChain, Provides) lives
in proxy/contract.py, a module that imports none of exchange, route or filter;
stages are declared by the policy modules themselves (proxy/registry.py). New
code imports from proxy/contract.py.
"""

from __future__ import annotations

from agproxy.proxy.contract import (BodyHook, Filter, FilterResult, LocalReply, Provides,  # noqa: F401
                                    Response, RouteChain)
