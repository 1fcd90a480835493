"""Webhooks against real HTTP receivers on loopback, verified with the real `standardwebhooks` package
as a user's receiver would: signatures, de-duplication ids, retries, give-up, timeouts, redirects,
huge answers, and the refusal of private addresses at submission and again at delivery."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from zimage_server import webhooks
from zimage_server.webhooks import (
    WebhookRefused,
    WebhookSender,
    backoff_delay,
    check_webhook_url,
    standard_secret,
)

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
PLAIN_SECRET = "correct horse battery staple!"
LOOPBACK = ("127.0.0.0/8",)
PAYLOAD = {"id": "job_1", "status": "succeeded", "images": [{"id": "img_1"}], "note": "é"}
FAST = {"first_delay_s": 0.02, "max_delay_s": 0.05, "attempt_timeout_s": 2.0, "give_up_after_s": 5.0}

# ------------------------------------------------------------------ a receiver on loopback


class Receiver:
    """A real HTTP server on 127.0.0.1 answering its n-th request with the n-th behaviour (the last
    one repeats); records every request's headers and body before answering."""

    def __init__(self, behaviours: list[Callable], tls: ssl.SSLContext | None = None, port: int = 0) -> None:
        self.behaviours = behaviours
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answered_2xx = 0
        self.release = threading.Event()  # ends hangs and stalls at teardown
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    index = len(receiver.requests)
                    receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                behaviour = receiver.behaviours[min(index, len(receiver.behaviours) - 1)]
                with contextlib.suppress(OSError):
                    behaviour(self, receiver)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @property
    def ids(self) -> list[str]:
        return [headers["webhook-id"] for headers, _ in self.requests]


def answer(status: int, body: bytes = b"", **headers: str) -> Callable:
    def behaviour(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name.replace("_", "-"), value)
        handler.send_header("content-length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        if 200 <= status < 300:
            receiver.answered_2xx += 1

    return behaviour


def hang(seconds: float) -> Callable:
    def behaviour(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        receiver.release.wait(seconds)
        answer(200)(handler, receiver)

    return behaviour


def huge(status: int) -> Callable:
    """Says 10 MB are coming, sends 1 MB, then stalls: a client that reads it all never finishes."""

    def behaviour(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
        handler.send_response(status)
        handler.send_header("content-length", str(10 * 1024 * 1024))
        handler.end_headers()
        handler.wfile.write(b"x" * (1024 * 1024))
        handler.wfile.flush()
        if 200 <= status < 300:
            receiver.answered_2xx += 1
        receiver.release.wait(10)

    return behaviour


def drip(handler: BaseHTTPRequestHandler, receiver: Receiver) -> None:
    """Sends a header line a byte every 50 ms for 3 s: each read succeeds, the answer does not end."""
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(60):
        if receiver.release.wait(0.05):
            break
        handler.wfile.write(b"a")
        handler.wfile.flush()


def verified(secret: str | bytes, receiver: Receiver) -> list[dict]:
    """Every recorded request verified with standardwebhooks, as a user's receiver does."""
    return [Webhook(secret).verify(body, headers) for headers, body in receiver.requests]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def webhook_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="zimage_server.webhooks")
    return caplog


# ------------------------------------------------------------------ signing


@pytest.mark.anyio
async def test_a_delivery_verifies_with_standardwebhooks_and_carries_the_envelope() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(200)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_job_1_done") is True
    [message] = verified(SECRET, receiver)
    assert message["type"] == "image.job.succeeded"
    assert message["data"] == PAYLOAD
    assert datetime.datetime.fromisoformat(message["timestamp"]).tzinfo is not None
    headers, _ = receiver.requests[0]
    assert headers["webhook-id"] == "evt_job_1_done"
    assert headers["content-type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    other = "whsec_" + base64.b64encode(bytes(range(1, 33))).decode()
    with pytest.raises(WebhookVerificationError):
        verified(other, receiver)


@pytest.mark.anyio
async def test_a_plain_secret_signs_with_its_utf8_bytes() -> None:
    sender = WebhookSender(PLAIN_SECRET, LOOPBACK, **FAST)
    with Receiver([answer(200)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.failed", PAYLOAD, "evt_2")
    # The two documented ways for a receiver: the UTF-8 bytes, or the whsec_ form.
    assert verified(PLAIN_SECRET.encode(), receiver)[0]["data"] == PAYLOAD
    assert standard_secret(PLAIN_SECRET) == "whsec_" + base64.b64encode(PLAIN_SECRET.encode()).decode()
    assert verified(standard_secret(PLAIN_SECRET), receiver)[0]["type"] == "image.job.failed"
    # The pitfall the docs warn about: Webhook(str) base64-decodes a plain string.
    with pytest.raises((WebhookVerificationError, ValueError)):
        verified(PLAIN_SECRET, receiver)


def test_secrets_that_cannot_sign_are_refused_without_showing_them() -> None:
    for bad in ("short secret", "whsec_not base64!!!!!!!!!!!!!", "whsec_" + base64.b64encode(b"7 bytes").decode()):
        with pytest.raises(ValueError) as caught:
            WebhookSender(bad, ())
        assert bad not in str(caught.value)
    assert standard_secret(SECRET) == SECRET
    unpadded = SECRET.rstrip("=")
    assert standard_secret(unpadded) == SECRET


# ------------------------------------------------------------------ retries


@pytest.mark.anyio
async def test_two_500s_then_200_is_one_accepted_delivery_with_one_id() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(500, b"oops", set_cookie="session=abc; Path=/"), answer(500), answer(200)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_retry") is True
    assert len(receiver.requests) == 3
    assert receiver.answered_2xx == 1
    assert receiver.ids == ["evt_retry"] * 3
    assert len({body for _, body in receiver.requests}) == 1  # the same event, byte for byte
    assert len(verified(SECRET, receiver)) == 3  # each attempt signed (afresh)
    assert all("cookie" not in headers for headers, _ in receiver.requests)  # receivers' cookies are not kept


@pytest.mark.anyio
async def test_a_2xx_is_never_sent_again() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(204), answer(500)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_once") is True
        await asyncio.sleep(0.2)  # time for any stray retry to arrive (there must be none)
    assert len(receiver.requests) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("status", [400, 401, 404, 410, 422])
async def test_a_4xx_stops_at_once_and_is_logged(status: int, webhook_log) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(status, b"bad signature"), answer(200)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_4xx") is False
    assert len(receiver.requests) == 1
    assert f"HTTP {status}" in webhook_log.text and "bad signature" in webhook_log.text


@pytest.mark.anyio
@pytest.mark.parametrize("status", [408, 429, 502, 503])
async def test_408_429_and_5xx_are_retried(status: int) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(status), answer(200)]) as receiver:
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_again") is True
    assert receiver.ids == ["evt_again"] * 2


@pytest.mark.anyio
async def test_retry_after_is_honoured_only_up_to_the_longest_delay() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"max_delay_s": 0.3}))
    with Receiver([answer(429, retry_after="3600"), answer(200)]) as receiver:
        started = time.monotonic()
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_ra") is True
        took = time.monotonic() - started
    assert 0.3 <= took < 2


@pytest.mark.anyio
async def test_a_receiver_that_keeps_failing_is_given_up_on_time(webhook_log) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"give_up_after_s": 0.6}))
    with Receiver([answer(503)]) as receiver:
        started = time.monotonic()
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_never") is False
        took = time.monotonic() - started
    assert 0.6 <= took < 2
    assert len(receiver.requests) >= 5
    assert set(receiver.ids) == {"evt_never"}
    assert "given up after" in webhook_log.text


@pytest.mark.anyio
async def test_a_refused_connection_is_retried_until_the_receiver_comes_up(webhook_log) -> None:
    port = free_port()
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"max_delay_s": 0.1}))
    task = asyncio.create_task(sender.deliver(f"http://127.0.0.1:{port}/hook", "image.job.cancelled", PAYLOAD, "evt_up"))
    await asyncio.sleep(0.5)
    assert not task.done()
    with Receiver([answer(200)], port=port) as receiver:
        assert await task is True
    assert len(receiver.requests) == 1
    assert "ConnectError" in webhook_log.text


def test_backoff_grows_exponentially_with_jitter_and_the_defaults_last_over_ten_minutes() -> None:
    for attempt in range(1, 15):
        ceiling = min(120.0, 2.0 ** (attempt - 1))
        for _ in range(20):
            assert ceiling / 2 <= backoff_delay(attempt, 1.0, 120.0) <= ceiling
    assert len({backoff_delay(5, 1.0, 120.0) for _ in range(20)}) > 1
    assert backoff_delay(10_000, 1.0, 120.0) <= 120.0
    assert WebhookSender(SECRET, ()).give_up_after_s >= 600


# ------------------------------------------------------------------ receivers that misbehave


@pytest.mark.anyio
async def test_a_hanging_receiver_is_cut_off_and_retried() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"attempt_timeout_s": 0.3}))
    with Receiver([hang(10), answer(200)]) as receiver:
        started = time.monotonic()
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_hang") is True
        took = time.monotonic() - started
    assert receiver.ids == ["evt_hang"] * 2
    assert 0.3 <= took < 2


@pytest.mark.anyio
async def test_a_receiver_that_drips_its_answer_is_cut_off_by_the_attempt_deadline() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"attempt_timeout_s": 0.3}))
    with Receiver([drip, answer(200)]) as receiver:
        started = time.monotonic()
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_drip") is True
        took = time.monotonic() - started
    assert receiver.ids == ["evt_drip"] * 2
    assert 0.3 <= took < 2


@pytest.mark.anyio
async def test_a_redirect_is_not_followed(webhook_log) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(200)]) as internal, Receiver([answer(307, location=internal.url)]) as redirecting:
        assert await sender.deliver(redirecting.url, "image.job.succeeded", PAYLOAD, "evt_3xx") is False
    assert len(redirecting.requests) == 1
    assert internal.requests == []
    assert "redirects are not followed" in webhook_log.text


@pytest.mark.anyio
@pytest.mark.parametrize("first", ["200", "500"])
async def test_a_huge_answer_is_not_read(first: str) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **(FAST | {"attempt_timeout_s": 5.0}))
    behaviours = [huge(200)] if first == "200" else [huge(500), answer(200)]
    with Receiver(behaviours) as receiver:
        started = time.monotonic()
        assert await sender.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_big") is True
        took = time.monotonic() - started
    # Reading the 10 MB would wait for the stall: the 5 s attempt timeout, or the log excerpt's 1 s.
    assert took < 0.9
    assert len(receiver.requests) == (1 if first == "200" else 2)


# ------------------------------------------------------------------ where webhooks may go

REFUSED = [
    ("ftp://example.com/hook", ("example.com",)),
    ("http://user:pw@127.0.0.1/", LOOPBACK),
    ("http://127.0.0.1/" + "a" * 10_000, LOOPBACK),
    ("http:///no-host", ()),
    ("http://127.0.0.1/with space", LOOPBACK),
]
PRIVATE = [
    ("http://127.0.0.1/", ("127.0.0.1",)),
    ("http://[::1]/", ("::1",)),
    ("http://169.254.169.254/latest/meta-data/", ("169.254.0.0/16",)),
    ("http://10.1.2.3/", ("10.0.0.0/8",)),
    ("http://localhost/", ("localhost",)),
    ("http://2130706433/", ("127.0.0.1",)),  # 127.0.0.1 spelled as one number
    ("http://[::ffff:10.0.0.1]/", ("10.0.0.0/8",)),  # IPv4-mapped
    ("http://[2002:7f00:1::]/", ("2002::/16",)),  # 6to4 of 127.0.0.1
    ("http://[64:ff9b::a00:1]/", ("64:ff9b::/96",)),  # NAT64 of 10.0.0.1
    ("http://100.64.0.1/", ("100.64.0.0/10",)),  # shared (CGNAT) space
    ("http://224.0.0.1/", ("224.0.0.1",)),
    ("http://0.0.0.0/", ("0.0.0.0/32",)),
    ("http://[fe80::1]/", ("fe80::/10",)),
    ("http://[fd00::1]/", ("fc00::/7",)),
    ("http://192.168.1.1/", ("192.168.1.1",)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("url", "allow"), REFUSED, ids=lambda v: str(v)[:40])
async def test_urls_of_the_wrong_form_are_refused_even_when_the_host_is_allowed(url, allow) -> None:
    with pytest.raises(WebhookRefused) as caught:
        await check_webhook_url(url, allow)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.anyio
@pytest.mark.parametrize(("url", "allow"), PRIVATE, ids=lambda v: str(v)[:40])
async def test_private_addresses_are_refused_unless_allowed(url, allow) -> None:
    with pytest.raises(WebhookRefused) as caught:
        await check_webhook_url(url, ())
    message = str(caught.value)
    assert "\n" not in message and "Z_IMAGE_WEBHOOK_ALLOW" in message
    await check_webhook_url(url, allow)
    with pytest.raises(WebhookRefused):
        await check_webhook_url(url, ("192.0.2.0/24", "other.example"))  # an unrelated allow-list


@pytest.mark.anyio
async def test_public_addresses_and_unresolvable_names() -> None:
    await check_webhook_url("https://93.184.215.14/hook?token=1", ())
    await check_webhook_url("http://[2606:4700::1111]:8443/x", ())
    await check_webhook_url("http://[::ffff:93.184.215.14]/", ())  # IPv4-mapped: judged as the IPv4 address
    with pytest.raises(WebhookRefused, match="loopback"):
        await check_webhook_url("http://[::ffff:127.0.0.1]/", ())
    with pytest.raises(WebhookRefused, match="does not resolve"):
        await check_webhook_url("https://no-such-host.invalid/hook", ())
    with pytest.raises(ValueError, match="not a valid network"):
        await check_webhook_url("https://93.184.215.14/", ("10.0.0.0/33",))
    with pytest.raises(ValueError, match="not a valid network"):
        WebhookSender(SECRET, ("10.0.0.0/33",))


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_target_allowed_at_submission_but_refused_at_delivery_is_dropped(host: str, webhook_log) -> None:
    """DNS rebinding: what the name pointed to at submission does not matter; delivery checks again."""
    with Receiver([answer(200)]) as receiver:
        url = f"http://{host}:{receiver.port}/hook"
        await check_webhook_url(url, (host, "::1", "127.0.0.0/8"))
        sender = WebhookSender(SECRET, ("192.0.2.0/24",), **FAST)  # the allow-list at delivery time
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_rebind") is False
    assert receiver.requests == []
    assert "dropped at delivery" in webhook_log.text


@pytest.mark.anyio
async def test_a_name_rebound_to_loopback_after_submission_is_dropped(monkeypatch, webhook_log) -> None:
    """The same allow-list, a name whose DNS answer changes: public at submission, loopback at delivery."""
    answers = iter([["93.184.215.14"], ["127.0.0.1"], ["127.0.0.1"]])

    async def rebinding_dns(host: str, port: int) -> list[str]:
        assert host == "hooks.example"
        return next(answers)

    monkeypatch.setattr(webhooks, "_resolve", rebinding_dns)
    with Receiver([answer(200)]) as receiver:
        url = f"http://hooks.example:{receiver.port}/hook"
        await check_webhook_url(url, ())
        sender = WebhookSender(SECRET, (), **FAST)
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_rebound") is False
    assert receiver.requests == []
    assert "hooks.example resolves to 127.0.0.1, a loopback address" in webhook_log.text


@pytest.mark.anyio
async def test_the_next_address_is_tried_when_the_first_refuses_connections(monkeypatch) -> None:
    async def two_addresses(host: str, port: int) -> list[str]:
        return ["127.0.0.2", "127.0.0.1"]  # the receiver listens on 127.0.0.1 only

    monkeypatch.setattr(webhooks, "_resolve", two_addresses)
    sender = WebhookSender(SECRET, ("hooks.example",), **(FAST | {"give_up_after_s": 0.0}))
    with Receiver([answer(200)]) as receiver:
        url = f"http://hooks.example:{receiver.port}/hook"
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_two") is True
    [(headers, _)] = receiver.requests
    assert headers["host"] == f"hooks.example:{receiver.port}"


@pytest.mark.anyio
async def test_an_allowed_host_name_keeps_its_host_header(webhook_log) -> None:
    """The request goes to a checked address, but the receiver still sees the name it was called by
    (localhost may resolve to ::1 first, where nothing listens: the next address is tried)."""
    sender = WebhookSender(SECRET, ("localhost",), **FAST)
    with Receiver([answer(200)]) as receiver:
        url = f"http://localhost:{receiver.port}/hook"
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_name") is True
    [(headers, _)] = receiver.requests
    assert headers["host"] == f"localhost:{receiver.port}"


@pytest.mark.anyio
async def test_logs_show_neither_the_secret_nor_the_query(webhook_log) -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with Receiver([answer(500), answer(200)]) as receiver:
        url = receiver.url + "?token=query-secret-123"
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_log") is True
    text = webhook_log.text
    assert receiver.url in text
    assert "query-secret-123" not in text
    assert SECRET not in text and SECRET[6:20] not in text
    assert SECRET not in repr(sender)


@pytest.mark.anyio
async def test_bad_payloads_and_ids_fail_at_the_call() -> None:
    sender = WebhookSender(SECRET, LOOPBACK, **FAST)
    with pytest.raises(TypeError):
        await sender.deliver("http://127.0.0.1:9/", "image.job.succeeded", {"x": object()}, "evt")
    with pytest.raises(ValueError):
        await sender.deliver("http://127.0.0.1:9/", "image.job.succeeded", {"x": float("nan")}, "evt")
    with pytest.raises(ValueError):
        await sender.deliver("http://127.0.0.1:9/", "image.job.succeeded", PAYLOAD, "has space")


# ------------------------------------------------------------------ HTTPS to a checked address


def _self_signed_localhost(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.anyio
async def test_https_is_verified_against_the_host_name_not_the_address(tmp_path: Path) -> None:
    cert, key = _self_signed_localhost(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    options = FAST | {"give_up_after_s": 0.3}
    with Receiver([answer(200)], tls=server_tls) as receiver:
        sender = WebhookSender(SECRET, ("localhost",), ssl_context=trust, **options)
        url = f"https://localhost:{receiver.port}/hook"
        assert await sender.deliver(url, "image.job.succeeded", PAYLOAD, "evt_tls") is True
        # The certificate names localhost only: called by address, verification must fail.
        by_address = WebhookSender(SECRET, LOOPBACK, ssl_context=trust, **options)
        assert await by_address.deliver(receiver.url, "image.job.succeeded", PAYLOAD, "evt_tls_ip") is False
        # And an untrusted certificate is refused even for the right name.
        untrusting = WebhookSender(SECRET, ("localhost",), ssl_context=ssl.create_default_context(), **options)
        assert await untrusting.deliver(url, "image.job.succeeded", PAYLOAD, "evt_tls_untrusted") is False
    assert len(verified(SECRET, receiver)) == 1
