"""The fuzz campaign's atheris harnesses (``fuzz_*.py``) and its oracles (``oracles.py``), which
the hypothesis tests in ``tests/fuzz/`` share."""
