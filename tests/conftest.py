"""Shared pytest configuration. Fixtures for areas live in tests/<area>/conftest.py and tests/support/."""
