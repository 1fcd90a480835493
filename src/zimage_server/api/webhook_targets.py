"""Where async jobs' webhooks go: the request's `webhook_url` checked at submission (a 400 in the
envelope), the server's Z_IMAGE_WEBHOOK_URL, and delivery through webhooks.py's signed sender."""

from __future__ import annotations

from typing import Any

from ..settings import Settings
from ..webhooks import WebhookRefused, WebhookSender, check_webhook_url
from .errors import ApiError


class WebhookTargets:
    def __init__(self, settings: Settings):
        self.allow = settings.webhook_allow
        self.sender = WebhookSender(settings.webhook_secret, self.allow) if settings.webhook_secret else None

    async def check(self, url: str) -> None:
        """A request's webhook_url: refused with a 400 unless it may be called (webhooks.py's rules)."""
        if self.sender is None:
            raise ApiError(
                400, "This server signs no webhooks (Z_IMAGE_WEBHOOK_SECRET is unset), so it calls none.",
                param="webhook_url",
            )  # fmt: skip
        try:
            await check_webhook_url(url, self.allow)
        except WebhookRefused as exc:
            raise ApiError(400, f"Invalid webhook_url: {exc}", param="webhook_url") from None

    async def deliver(self, url: str, event_type: str, payload: dict[str, Any], event_id: str) -> bool:
        if self.sender is None:
            return False
        return await self.sender.deliver(url, event_type, payload, event_id)
