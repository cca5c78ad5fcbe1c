"""Attention math as plain torch (no vLLM import)."""
