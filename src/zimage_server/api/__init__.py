"""The HTTP layer: Litestar app factory, routes, request/response structs, error mapping."""

from .app import create_app

__all__ = ["create_app"]
