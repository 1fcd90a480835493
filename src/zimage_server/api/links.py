"""Absolute, signed links to stored images, as clients outside the server can open them.

The base is Z_IMAGE_PUBLIC_URL when set. Otherwise it is the request's own scheme and Host, and
the X-Forwarded-Proto, -Host and -Prefix headers count only from a peer in
Z_IMAGE_TRUSTED_PROXIES: anyone else could point the links at a host of their choosing. (uvicorn's
own proxy-header handling is off, see shutdown.py: it trusts loopback by default and ignores
X-Forwarded-Host, so it would do both too much and too little.)
"""

from __future__ import annotations

import functools
import ipaddress
import re

from litestar import Request

from ..index import ImageRecord
from .state import ServerState

HOST_PATTERN = re.compile(r"^[A-Za-z0-9.\-]+(:\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](:\d{1,5})?$")
PREFIX_PATTERN = re.compile(r"^(/[A-Za-z0-9._~\-]+)*/?$")


@functools.cache
def networks(proxies: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def from_trusted_proxy(request: Request, proxies: tuple[str, ...]) -> bool:
    if not proxies or request.client is None:
        return False
    try:
        peer = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(peer in network for network in networks(proxies))


def forwarded(request: Request, name: str) -> str | None:
    """The first value of an X-Forwarded-* header (the one the outermost proxy saw), if any."""
    value = request.headers.get(name)
    return value.split(",")[0].strip() if value else None


def configured_base(server: ServerState) -> str:
    """The base URL without a request to take it from (webhooks, MCP's own-host check):
    Z_IMAGE_PUBLIC_URL, else the address the server listens on."""
    settings = server.settings
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/")


def public_base(request: Request, server: ServerState) -> str:
    """scheme://host[/prefix] of this server as the client reached it."""
    settings = server.settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme = request.url.scheme
    host = request.headers.get("host", "")
    prefix = ""
    if from_trusted_proxy(request, settings.trusted_proxies):
        proto = (forwarded(request, "x-forwarded-proto") or "").lower()
        scheme = proto if proto in ("http", "https") else scheme
        host = forwarded(request, "x-forwarded-host") or host
        prefix = forwarded(request, "x-forwarded-prefix") or ""
        prefix = prefix.rstrip("/") if PREFIX_PATTERN.match(prefix) else ""
    if not HOST_PATTERN.match(host):
        host = f"{settings.host}:{settings.port}"  # a Host header no URL can hold
    return f"{scheme}://{host}{prefix}"


def image_link(request: Request, server: ServerState, record: ImageRecord) -> tuple[str, int]:
    """The image's signed link and when it expires (Unix time)."""
    query, expires_at = server.signer.sign(record.id)
    return f"{public_base(request, server)}/v1/images/{record.id}/content?{query}", expires_at
