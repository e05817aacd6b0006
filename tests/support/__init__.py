"""Helpers shared by the test suite (real processes the tests start and stop)."""
