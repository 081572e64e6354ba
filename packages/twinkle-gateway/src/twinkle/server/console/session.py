"""Console sign-in: an API key typed once becomes a signed, expiring session cookie.

The cookie holds the principal id (never the key), whether it is an admin, and an expiry, signed with
HMAC-SHA256 under a secret kept in the state store; it is ``HttpOnly``, ``SameSite=Strict`` and scoped to the
console's path. Forms that change something also carry a token derived from the cookie (``csrf``), so a page
elsewhere cannot submit them even where a browser ignores SameSite.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from typing import Any

from ..auth import Principal

COOKIE = "twinkle_console"
SESSION_S = 12 * 3600
_SECRET_KEY = "console_session_secret"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class ConsoleSessions:
    """Signs and checks console sessions with a secret from the store (created on first use)."""

    def __init__(self, store_of: Any) -> None:
        self._store_of = store_of  # () -> Store: the store exists once the app has started
        self._secret: bytes | None = None

    async def _key(self) -> bytes:
        if self._secret is None:
            stored = await self._store_of().meta_setdefault(_SECRET_KEY, secrets.token_hex(32))
            self._secret = bytes.fromhex(stored)
        return self._secret

    def _mac(self, key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())

    async def issue(self, principal: Principal, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_S)
        payload = f"{principal.id}.{int(principal.admin)}.{expires}"
        return f"{payload}.{self._mac(await self._key(), payload)}"

    async def check(self, cookie: str | None, now: float | None = None) -> Principal | None:
        """The signed-in principal, or None for a missing, forged or expired cookie."""
        if not cookie or cookie.count(".") != 3:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(await self._key(), payload)):
            return None
        principal, admin, expires = payload.split(".")
        if not expires.isdigit() or int(expires) < (now or time.time()):
            return None
        return Principal(id=principal, admin=admin == "1")

    async def csrf(self, cookie: str) -> str:
        return self._mac(await self._key(), f"csrf\n{cookie}")

    async def check_csrf(self, cookie: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token, await self.csrf(cookie))
