"""Helpers and programs of the client matrix (tests/test_clients_*.py)."""
