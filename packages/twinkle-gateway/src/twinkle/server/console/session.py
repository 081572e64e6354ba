"""Console sign-in: an API key typed once becomes a signed, expiring session cookie.

The cookie holds the principal id (never the key) and an expiry, signed with HMAC-SHA256 under a secret kept
in the state store; it is ``HttpOnly``, ``SameSite=Strict`` and scoped to the console's path. Each request
looks the principal up in the key ring as configured now, so a key removed (or no longer an admin's) loses
its console at the next restart that applies the change, not when the cookie expires. Forms that change
something also carry a token derived from the cookie (``csrf``), so a page elsewhere cannot submit them even
where a browser ignores SameSite.
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

    def __init__(self, plane: Any) -> None:
        self._plane = plane  # its store and key ring exist once the app has started
        self._secret: bytes | None = None

    async def _key(self) -> bytes:
        if self._secret is None:
            stored = await self._plane.store.meta_setdefault(_SECRET_KEY, secrets.token_hex(32))
            self._secret = bytes.fromhex(stored)
        return self._secret

    def _mac(self, key: bytes, payload: str) -> str:
        return _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())

    async def issue(self, principal: Principal, now: float | None = None) -> str:
        expires = int((now or time.time()) + SESSION_S)
        payload = f"{principal.id}.{expires}"
        return f"{payload}.{self._mac(await self._key(), payload)}"

    async def check(self, cookie: str | None, now: float | None = None) -> Principal | None:
        """The signed-in principal, or None for a missing, forged or expired cookie or a key no longer served."""
        if not cookie or cookie.count(".") != 2:
            return None
        payload, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac, self._mac(await self._key(), payload)):
            return None
        principal, expires = payload.split(".")
        if not expires.isdigit() or int(expires) < (now or time.time()) or self._plane.keyring is None:
            return None
        return self._plane.keyring.principal(principal)

    async def csrf(self, cookie: str) -> str:
        return self._mac(await self._key(), f"csrf\n{cookie}")

    async def check_csrf(self, cookie: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token, await self.csrf(cookie))
