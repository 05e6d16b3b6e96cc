"""Routers whose routes take their OpenAPI summary from the endpoint's one-line docstring."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.routing import APIRoute


class DocumentedRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        doc = (endpoint.__doc__ or "").strip()
        if doc and not kwargs.get("summary"):
            kwargs["summary"] = doc.splitlines()[0].rstrip(".")
        super().__init__(path, endpoint, **kwargs)


def api_router(**kwargs: Any) -> APIRouter:
    """An `APIRouter` for a domain: docstring summaries, shared error responses."""
    return APIRouter(route_class=DocumentedRoute, **kwargs)
