"""Prefill/decode disaggregation: KV transfer backends (base.py, tcp.py) and the engine roles (roles.py)."""
