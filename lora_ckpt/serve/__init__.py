"""The HTTP inference service on top of an AdapterPool (Starlette + uvicorn)."""

from .app import create_app  # noqa: F401
