"""Webhooks for finished async jobs: signed the Standard Webhooks way, retried, and kept off private networks.

When a job finishes, the server POSTs `{"type": "image.job.succeeded", "timestamp": ISO-8601, "data": job}`
to the job's `webhook_url` and/or `Z_IMAGE_WEBHOOK_URL`, with the headers `webhook-id` (the same on
every retry of one event: receivers de-duplicate on it), `webhook-timestamp` (Unix seconds of this
attempt) and `webhook-signature` (`v1,` + base64 HMAC-SHA256 over `id.timestamp.body`).

The secret (`Z_IMAGE_WEBHOOK_SECRET`) comes in two forms:

* `whsec_` + base64 (the Standard Webhooks form): the signing key is the base64-decoded bytes.
  Receivers pass the same string: `standardwebhooks.Webhook("whsec_...")`.
* any other string of 16+ characters: the signing key is its UTF-8 bytes, as it is (no base64
  decoding). Receivers pass those bytes, `Webhook(secret.encode())`, or the whsec_ form that
  `standard_secret(secret)` gives (`"whsec_" + base64(UTF-8 bytes)`), which every Standard Webhooks
  library accepts. Passing the plain string to `Webhook(str)` does NOT work: it base64-decodes it.

Either way the key must be at least 16 bytes.

Where a webhook may go: http(s) only, no credentials in the URL, at most 2048 characters, and every
address its host resolves to must be public (not private, loopback, link-local, multicast, reserved,
unspecified or otherwise not global, IPv4-mapped, 6to4 and NAT64 forms included) unless the host
name or a network holding the address is in `Z_IMAGE_WEBHOOK_ALLOW`. `check_webhook_url` checks at
submission; every delivery attempt resolves and checks again and connects to an address it just
checked (the request goes to that IP, with the original Host header and TLS server name), so a DNS
answer that changes in between (DNS rebinding) cannot point the server at an internal address.
Redirects are never followed, each attempt has a hard deadline, and at most a few KB of a response
are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

__all__ = ["WebhookRefused", "WebhookSender", "backoff_delay", "check_webhook_url", "standard_secret"]

log = logging.getLogger("zimage_server.webhooks")

MAX_URL_LENGTH = 2048
MIN_KEY_BYTES = 16
RESPONSE_READ_LIMIT = 4096  # bytes of a non-2xx answer read for the log line; the rest is never read
RESOLVE_TIMEOUT_S = 5.0  # check_webhook_url's DNS budget at submission
MAX_ADDRESSES_TRIED = 4  # per attempt, when connecting to the first ones is refused
_SECRET_PREFIX = "whsec_"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """This webhook URL may not be called; the one-line message says why (the route answers 400 with it)."""


# ---------------------------------------------------------------- the secret


def _signing_key(secret: str) -> bytes:
    """The HMAC key for `secret` (see the module docstring); never puts the secret in a message."""
    if secret.startswith(_SECRET_PREFIX):
        encoded = secret[len(_SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the webhook secret starts with whsec_ but the rest is not base64") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the webhook secret's whsec_ key must decode to at least {MIN_KEY_BYTES} bytes")
        return key
    key = secret.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the webhook secret must be at least {MIN_KEY_BYTES} characters, or whsec_ + base64")
    return key


def standard_secret(secret: str) -> str:
    """The whsec_ form of the secret, what receivers give `standardwebhooks.Webhook(...)`; unchanged
    when it already is one."""
    return _SECRET_PREFIX + base64.b64encode(_signing_key(secret)).decode("ascii")


# ---------------------------------------------------------------- where webhooks may go


def _shown(url: str | httpx.URL) -> str:
    """The URL as logged: no query string, fragment or credentials."""
    try:
        parsed = httpx.URL(url) if isinstance(url, str) else url
        port = f":{parsed.port}" if parsed.port is not None else ""
        host = parsed.raw_host.decode("ascii")
        host = f"[{host}]" if ":" in host else host
        return f"{parsed.scheme}://{host}{port}{parsed.raw_path.split(b'?')[0].decode('ascii')}"
    except (httpx.InvalidURL, UnicodeError, ValueError, TypeError):
        return "<unparseable URL>"


def _parse(url: str) -> httpx.URL:
    """The URL, if its form is acceptable: http(s), no credentials, a host, at most 2048 characters."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"webhook URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise WebhookRefused("webhook URL contains spaces or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError, ValueError, TypeError):
        raise WebhookRefused("webhook URL is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefused("webhook URL must start with http:// or https://")
    if parsed.userinfo:
        raise WebhookRefused("webhook URL may not carry credentials (user:password@)")
    if not parsed.raw_host:
        raise WebhookRefused("webhook URL has no host")
    return parsed


def _parse_allow(allow: tuple[str, ...]) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """The allow-list as host names and networks; an entry with '/' must be a valid network (CIDR)."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in allow:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            if "/" in entry:
                raise ValueError(f"webhook allow-list entry {entry!r} is not a valid network (CIDR)") from None
            names.add(_normal_host(entry))
    return frozenset(names), tuple(networks)


def _normal_host(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def _unwrapped(address: IPAddress) -> IPAddress:
    """The IPv4 address inside an IPv4-mapped IPv6 one, else the address itself."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _refusal(address: IPAddress) -> str | None:
    """Why webhooks may not call this address (e.g. 'loopback'), or None when it is public."""
    address = _unwrapped(address)
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.sixtofour
        if embedded is None and address in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (why := _refusal(embedded)) is not None:
            return f"{why} (embedded in {address})"
    for flag, why in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(address, flag):
            return why
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if not address.is_global:
        return "not public"
    return None


def _allowed_address(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    forms = {address, _unwrapped(address)}
    return any(form.version == network.version and form in network for form in forms for network in networks)


async def _resolve(host: str, port: int) -> list[str]:
    """Every address (A and AAAA) `host` resolves to, in the resolver's order, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%")[0]
        if text not in addresses:
            addresses.append(text)
    if not addresses:
        raise OSError(f"{host} has no addresses")
    return addresses


async def _checked_target(parsed: httpx.URL, allow: tuple[str, ...]) -> list[str]:
    """The addresses to connect to for this URL, each one checked. Raises WebhookRefused, or OSError
    when the name does not resolve."""
    names, networks = _parse_allow(allow)
    host = _normal_host(parsed.raw_host.decode("ascii"))
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = await _resolve(host, port)
    if host in names:
        return addresses
    for text in addresses:
        address = ipaddress.ip_address(text)
        why = _refusal(address)
        if why is not None and not _allowed_address(address, networks):
            what = f"webhook address {text} is" if text == host else f"webhook host {host} resolves to {text},"
            raise WebhookRefused(
                f"{what} a {why} address; webhooks may call it only if Z_IMAGE_WEBHOOK_ALLOW lists "
                "the host or a network holding the address"
            )
    return addresses


async def check_webhook_url(url: str, allow: tuple[str, ...]) -> None:
    """Refuse (WebhookRefused, one line) a webhook URL the server may not call: not http(s),
    credentials in it, over 2048 characters, no host, a host that does not resolve, or any address
    of the host private, loopback, link-local, multicast, reserved or unspecified, unless the host
    name or a network holding the address is in `allow` (names or CIDR networks). ValueError (not
    WebhookRefused) for a malformed allow-list network."""
    parsed = _parse(url)
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            await _checked_target(parsed, allow)
    except TimeoutError:
        raise WebhookRefused(f"webhook host {parsed.host} did not resolve within {RESOLVE_TIMEOUT_S:g} s") from None
    except OSError:
        raise WebhookRefused(f"webhook host {parsed.host} does not resolve") from None


# ---------------------------------------------------------------- delivery


def backoff_delay(attempt: int, first_delay_s: float, max_delay_s: float) -> float:
    """Seconds to wait after failed attempt number `attempt` (1, 2, ...): first_delay_s doubled each
    time up to max_delay_s, then a random point in its upper half (jitter, so that many webhooks
    failing together do not all come back at once)."""
    ceiling = min(max_delay_s, first_delay_s * 2.0 ** min(attempt - 1, 62))
    return random.uniform(ceiling / 2, ceiling)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class _Outcome:
    OK, RETRY, FINAL = "ok", "retry", "final"


class WebhookSender:
    """Delivers signed webhooks with retries; one per server.

    attempt_timeout_s bounds each attempt from DNS to the status line; failed attempts (5xx, 408,
    429, timeouts, refused connections, DNS failures) are retried after `backoff_delay` until
    give_up_after_s have passed since the first one; a 2xx ends it, as do 3xx (never followed) and
    other 4xx. `ssl_context` is for a private CA (and tests); None verifies against certifi.
    """

    def __init__(
        self,
        secret: str,
        allow: tuple[str, ...],
        *,
        attempt_timeout_s: float = 10.0,
        give_up_after_s: float = 900.0,
        first_delay_s: float = 1.0,
        max_delay_s: float = 120.0,
        max_concurrent: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._webhook = Webhook(_signing_key(secret))
        _parse_allow(allow)  # a bad network fails here, at start-up
        self.allow = tuple(allow)
        self.attempt_timeout_s = attempt_timeout_s
        self.give_up_after_s = give_up_after_s
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self._ssl_context = ssl_context
        self._max_concurrent = max_concurrent
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def __repr__(self) -> str:
        return f"WebhookSender(allow={self.allow!r})"

    def _attempt_slots(self) -> asyncio.Semaphore:
        """Caps attempts in flight (waits between attempts hold none); one semaphore per event loop."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self._max_concurrent))
        return self._slots[1]

    def _http(self) -> httpx.AsyncClient:
        """A client for one attempt. Nothing is shared between attempts: no pooled connection (the
        request goes to a checked IP with the host's TLS name, and a pool matches connections by IP
        alone, so one could serve another host name) and no cookies from one receiver to another."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context(trust_env=False)  # certifi's CAs, built once
        return httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=self._ssl_context,
            timeout=httpx.Timeout(self.attempt_timeout_s),
            headers={"user-agent": "zimage-server-webhooks", "accept-encoding": "identity"},
        )

    @staticmethod
    def body(event_type: str, payload: Mapping[str, Any]) -> str:
        """The JSON body: Standard Webhooks' envelope around the payload. TypeError/ValueError when
        the payload is not JSON."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        envelope = {"type": event_type, "timestamp": now, "data": dict(payload)}
        return json.dumps(envelope, separators=(",", ":"), allow_nan=False)

    @staticmethod
    def _check_event_id(event_id: str) -> None:
        if not (0 < len(event_id) <= 256 and all(0x21 <= ord(char) <= 0x7E for char in event_id)):
            raise ValueError("webhook event id must be 1-256 printable ASCII characters without spaces")

    async def deliver(self, url: str, event_type: str, payload: Mapping[str, Any], event_id: str) -> bool:
        """POST the event to `url` until a 2xx answers (True) or it gives up, the answer is final
        or the URL is refused now (False, logged). `event_id` is the webhook-id of every attempt."""
        self._check_event_id(event_id)
        return await self._deliver(url, self.body(event_type, payload), event_id)

    async def _deliver(self, url: str, body: str, event_id: str) -> bool:
        shown = _shown(url)
        try:
            parsed = _parse(url)
        except WebhookRefused as exc:
            log.warning("webhook %s to %s dropped: %s", event_id, shown, exc)
            return False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_after_s
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    outcome, detail, wait_at_least = await self._attempt(parsed, body, event_id, attempt)
                except WebhookRefused as exc:
                    log.warning("webhook %s to %s dropped at delivery: %s", event_id, shown, exc)
                    return False
                if outcome == _Outcome.OK:
                    log.info("webhook %s delivered to %s (%s, attempt %d)", event_id, shown, detail, attempt)
                    return True
                if outcome == _Outcome.FINAL:
                    log.warning("webhook %s to %s failed for good on attempt %d: %s", event_id, shown, attempt, detail)
                    return False
                left = deadline - loop.time()
                if left <= 0:
                    log.warning(
                        "webhook %s to %s given up after %d attempts in %g s; last: %s",
                        event_id, shown, attempt, self.give_up_after_s, detail,
                    )
                    return False
                delay = backoff_delay(attempt, self.first_delay_s, self.max_delay_s)
                if wait_at_least is not None:
                    delay = max(delay, min(wait_at_least, self.max_delay_s))
                delay = min(delay, left)
                log.info(
                    "webhook %s to %s attempt %d failed (%s); retrying in %.1f s", event_id, shown, attempt, detail, delay
                )
                await asyncio.sleep(delay)
        except Exception:
            log.exception("webhook %s to %s failed unexpectedly", event_id, shown)
            return False

    async def _attempt(
        self, parsed: httpx.URL, body: str, event_id: str, attempt: int
    ) -> tuple[str, str, float | None]:
        """One attempt: resolve and check the host again, POST to a checked address (the next one
        when connecting is refused; each attempt starts one further along, so an address that
        swallows connections does not eat every attempt). Returns the outcome, a short description
        for the log, and the receiver's Retry-After (429/503)."""
        async with self._attempt_slots():
            try:
                async with asyncio.timeout(self.attempt_timeout_s):
                    addresses = await _checked_target(parsed, self.allow)
                    start = (attempt - 1) % len(addresses)
                    addresses = addresses[start:] + addresses[:start]
                    last_error: httpx.ConnectError | None = None
                    for address in addresses[:MAX_ADDRESSES_TRIED]:
                        try:
                            return await self._post(parsed, address, body, event_id)
                        except httpx.ConnectError as exc:  # nothing was sent: the next address may answer
                            last_error = exc
                    assert last_error is not None
                    raise last_error
            except TimeoutError:
                return _Outcome.RETRY, f"no answer within {self.attempt_timeout_s:g} s", None
            except (httpx.TransportError, OSError) as exc:
                return _Outcome.RETRY, f"{type(exc).__name__}: {str(exc)[:200]}", None

    async def _post(self, parsed: httpx.URL, address: str, body: str, event_id: str) -> tuple[str, str, float | None]:
        now = int(time.time())
        headers = {
            "host": parsed.netloc.decode("ascii"),
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(now),
            "webhook-signature": self._webhook.sign(event_id, datetime.fromtimestamp(now, UTC), body),
        }
        async with self._http() as client:
            request = client.build_request(
                "POST",
                parsed.copy_with(host=address),
                content=body.encode("utf-8"),
                headers=headers,
                extensions={"sni_hostname": parsed.raw_host.decode("ascii")},
            )
            response = await client.send(request, stream=True)
            try:
                status = response.status_code
                if 200 <= status < 300:
                    return _Outcome.OK, f"HTTP {status}", None
                excerpt = await _read_some(response)
                detail = f"HTTP {status} {excerpt!r}" if excerpt else f"HTTP {status}"
                if status >= 500 or status in (408, 429):
                    return _Outcome.RETRY, detail, _retry_after(response) if status in (429, 503) else None
                if 300 <= status < 400:
                    return _Outcome.FINAL, f"{detail}; redirects are not followed, give the final URL", None
                return _Outcome.FINAL, detail, None
            finally:
                await response.aclose()  # closes the connection, unread body and all


async def _read_some(response: httpx.Response) -> str:
    """The start of the body (raw, never decompressed), for the log; a stall (1 s) or an error just ends it."""
    data = b""
    try:
        async with asyncio.timeout(1.0):
            async for chunk in response.aiter_raw():
                data += chunk
                if len(data) >= RESPONSE_READ_LIMIT:
                    break
    except (TimeoutError, httpx.HTTPError):
        pass
    return data[:200].decode("utf-8", "replace")
