"""Signed, expiring image links: `/v1/images/{id}/content?expires=T&signature=S`.

The link is a bearer credential, as OpenAI's and OpenRouter's image URLs are: a plain GET with no
Authorization header returns the image until T. S is HMAC-SHA256 over the image id and T with
the server's URL secret, so a link cannot be moved to another image or stretched in time. The
server signs its own links, even over S3, instead of handing out presigned bucket URLs: the
bucket is often not reachable by clients (a private network, a loopback SeaweedFS), and one
scheme serves every store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass


class BadSignature(ValueError):
    """The link's signature does not match, or it has expired; the message says which."""


@dataclass(frozen=True)
class UrlSigner:
    secret: bytes
    ttl_s: int

    def sign(self, image_id: str, now: float | None = None) -> tuple[str, int]:
        """The query string for a link to the image, and when it expires (Unix time)."""
        expires = int(now if now is not None else time.time()) + self.ttl_s
        return f"expires={expires}&signature={self._signature(image_id, expires)}", expires

    def verify(self, image_id: str, expires: str, signature: str, now: float | None = None) -> None:
        """Raises BadSignature unless the signature is this server's for this image and has not expired."""
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
            raise BadSignature("the link's expiry is malformed")
        expected = self._signature(image_id, int(expires))
        # Constant-time, so response timing does not reveal how much of a forged signature matched.
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise BadSignature("the link's signature is not valid for this image")
        if int(expires) < (now if now is not None else time.time()):
            raise BadSignature("the link has expired; ask for the image again for a fresh one")

    def _signature(self, image_id: str, expires: int) -> str:
        mac = hmac.new(self.secret, f"{image_id}\n{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
