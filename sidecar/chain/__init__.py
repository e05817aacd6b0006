"""The chain side of the sidecar: from metered tokens to on-chain claims and settlement.

``policy`` (when and how much to claim: pure), ``marketplace`` (the JobMarketplace versions'
calldata, decoding and reverts: pure), ``proofs`` (the claims' deterministic proof material),
``rpc`` (reading the chain), ``sender`` (the one sender of the host's transactions),
``admission`` (the cached on-chain views that admit a job), ``worker`` (the claim worker) and
``service`` (the facade the rest of the sidecar calls). ``abi/v1.json`` and ``abi/v2.json`` are the
public contracts' entries for what the sidecar calls and reads.

Importing this package loads nothing heavy: config.py imports ``policy`` for the contract's
minimum claim, and a sidecar without a chain must not load web3.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType
from typing import Any


class _KeepRecursionLimit(MetaPathFinder):
    """Loads ``py_ecc`` (which eth_account and web3 import) without its change to the
    interpreter's recursion limit.

    py_ecc raises the limit to 100000 when it is imported. With that limit a deeply nested JSON
    request body overflows the C stack (a segfault) before json raises the RecursionError that
    the proxy turns into a 400. A finder, rather than importing eth_account here and putting the
    limit back, so that this package stays cheap to import and whichever module loads web3 first
    is covered.
    """

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "py_ecc":
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LimitKeepingLoader(spec.loader)
        return spec


class _LimitKeepingLoader(Loader):
    """``loader``, but the recursion limit is the same after the module ran as before."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # get_source, is_package...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        limit = sys.getrecursionlimit()
        try:
            self._loader.exec_module(module)
        finally:
            sys.setrecursionlimit(limit)


if not any(isinstance(finder, _KeepRecursionLimit) for finder in sys.meta_path):
    sys.meta_path.insert(0, _KeepRecursionLimit())
