"""The chain side of the sidecar: the JobMarketplace contract versions (``marketplace``), the
deterministic proof material of claims (``proofs``) and their ABIs (``abi/v1.json``,
``abi/v2.json``, the public contracts' entries for what the sidecar calls and reads)."""

import sys as _sys

# eth_account imports py_ecc, which raises the interpreter's recursion limit to 100000 at import.
# With that limit, a deeply nested JSON request body overflows the C stack (a segfault) before
# json raises the RecursionError the proxy turns into a 400. Put the limit back.
_limit = _sys.getrecursionlimit()
import eth_account  # noqa: E402, F401

_sys.setrecursionlimit(_limit)
