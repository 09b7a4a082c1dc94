"""Serving many adapters on one base model: slot storage, the slot table, the pool, stores and the HTTP service."""
