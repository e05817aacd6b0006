"""Development tools of a checkout: the local chain (``python -m devtools.devnet``), the
end-to-end demo (``python -m devtools.demo``, behind ``make demo``), the engine launcher the demo
and the tests share, and their child-process rules.

Not part of the installed package (pyproject.toml packages only ``sidecar*``): these tools use
the checkout itself (devchain/, upstream/), so they run from the repository root.
"""
