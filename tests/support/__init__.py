"""Helpers shared by the test suites (fault-injection proxy and friends)."""
