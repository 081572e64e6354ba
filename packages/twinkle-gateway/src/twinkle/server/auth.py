"""API-key authentication: ``X-API-Key`` → a principal.

Design points (a raw key must never become an id, a stored value or a log line):

- Admin keys (``admin_keys``, ``role: admin`` in the YAML, ``TWINKLE_ADMIN_KEYS``) are keys like the others
  whose principal may also read every tenant's usage and the services' internals. In open mode (below) the
  single local user is the admin.
- Keys come from the server config (``api_keys``) and from ``TWINKLE_API_KEYS`` (comma-separated). They are
  stored as salted SHA-256 digests (one random salt per state database); the raw key is never written to
  the database or to a log.
- A principal id is a short, stable, one-way hash of the key (``p-`` + 16 hex digits). It owns runs,
  checkpoints and sessions, and names the owner's checkpoint directory. It does not depend on the salt, so
  wiping the state database does not orphan checkpoint directories.
- With no keys configured, a server bound only to loopback runs *open*: any key starting with ``tml-`` (the
  official SDK insists on that prefix client-side) is accepted and each distinct key is its own principal.
  Bound to any other address without keys, the server refuses to start (``check_auth_settings``).
- An unknown key gets 401; another principal's resource is reported exactly like a missing one (404), by
  the handlers, so ids cannot be probed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import secrets
import time
from typing import TYPE_CHECKING, Any, Iterable

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, ServiceUnavailableException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import ASGIApp

if TYPE_CHECKING:  # the store imports nothing from here; importing it lazily keeps core -> auth acyclic
    from .core.state import Store

log = logging.getLogger("twinkle.server.auth")

API_KEY_HEADER = "x-api-key"
KEYS_ENV = "TWINKLE_API_KEYS"
ADMIN_KEYS_ENV = "TWINKLE_ADMIN_KEYS"
TINKER_KEY_PREFIX = "tml-"
_SALT_META = "auth_salt"


class AuthConfigError(ValueError):
    """The server's auth settings are unsafe or invalid; raised before anything starts."""


class Principal(msgspec.Struct, frozen=True):
    """Who is calling. ``id`` is what owns resources."""

    id: str
    open_mode: bool = False
    admin: bool = False


def principal_id(raw_key: str) -> str:
    return "p-" + hashlib.sha256(b"twinkle-principal\x00" + raw_key.encode()).hexdigest()[:16]


def hash_key(raw_key: str, salt: bytes) -> str:
    return hashlib.sha256(salt + b"\x00" + raw_key.encode()).hexdigest()


def keys_from_env(name: str = KEYS_ENV) -> list[str]:
    raw = os.environ.get(name, "")
    return [k.strip() for k in raw.split(",") if k.strip()]


def is_loopback(host: str) -> bool:
    host = (host or "").strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname other than localhost may resolve to anything


def check_auth_settings(host: str, keys: Iterable[str] | None) -> list[str]:
    """Validate auth for a server about to bind ``host``; return the effective keys (config + env).

    Raises ``AuthConfigError`` when no key is configured and ``host`` is not a loopback address: an open
    server on a network interface would let anyone train, sample and read checkpoints.
    """
    effective = _dedupe([*(keys or []), *keys_from_env()])
    for index, key in enumerate(effective):
        if not isinstance(key, str) or not key.strip() or any(c.isspace() for c in key) or "," in key:
            raise AuthConfigError(f"api_keys[{index}] must be a non-empty string without spaces or commas")
    if not effective and not is_loopback(host):
        raise AuthConfigError(
            f"refusing to start: the server binds {host!r}, which is reachable from the network, and no API key "
            f"is configured. Set `api_keys` in the server application's args or the {KEYS_ENV} environment "
            "variable (comma-separated, e.g. tml-<random>), or bind to 127.0.0.1."
        )
    return effective


def _dedupe(keys: list[str]) -> list[str]:
    return list(dict.fromkeys(keys))


class KeyRing:
    """Answers "which principal is this key?" from the configured and stored keys."""

    def __init__(self, hashes: dict[str, str], salt: bytes, *, open_mode: bool, admins: Iterable[str] = ()) -> None:
        self._principals_by_hash = hashes
        self._principals = frozenset(hashes.values())
        self._salt = salt
        self.open_mode = open_mode
        self.admins = frozenset(admins)

    @classmethod
    async def load(cls, store: Store, keys: list[str], *, host: str, admin_keys: Iterable[str] = ()) -> "KeyRing":
        """Sync the configured keys into the store and build the ring. ``keys`` are already validated and
        include the admin keys."""
        from .core.state import ApiKeyRecord

        salt = bytes.fromhex(await store.meta_setdefault(_SALT_META, secrets.token_hex(16)))
        now = time.time()
        await store.replace_keys(
            "config",
            [ApiKeyRecord(key_hash=hash_key(k, salt), principal=principal_id(k), source="config", created=now)
             for k in keys],
        )
        stored = await store.list_keys()
        open_mode = not stored
        if open_mode:
            check_auth_settings(host, [])  # raises unless loopback
            log.warning(
                "no API keys configured: open mode on loopback (%s); any X-API-Key starting with %r is accepted "
                "and each distinct key is its own user. Configure api_keys or %s before exposing this server.",
                host, TINKER_KEY_PREFIX, KEYS_ENV,
            )
        for k in keys:
            if not k.startswith(TINKER_KEY_PREFIX):
                log.warning("a configured API key does not start with %r; the official tinker SDK will refuse "
                            "to send it", TINKER_KEY_PREFIX)
        return cls({k.key_hash: k.principal for k in stored}, salt, open_mode=open_mode,
                   admins=[principal_id(k) for k in admin_keys])

    def principal(self, principal_id: str) -> Principal | None:
        """The principal ``principal_id`` as the keys configured now make it (None if no key maps to it any
        more): for sign-ins that outlive the request, such as the console's."""
        if self.open_mode:
            return Principal(id=principal_id, open_mode=True, admin=True)
        if principal_id not in self._principals:
            return None
        return Principal(id=principal_id, admin=principal_id in self.admins)

    def authenticate(self, raw_key: str | None) -> Principal:
        if not raw_key:
            raise NotAuthorizedException(
                detail="missing API key: send it in the X-API-Key header (tinker: ServiceClient(api_key=...))"
            )
        if self.open_mode:
            if not raw_key.startswith(TINKER_KEY_PREFIX):
                raise NotAuthorizedException(
                    detail=f"invalid API key: this server runs without configured keys and accepts any key "
                    f"starting with {TINKER_KEY_PREFIX!r}"
                )
            return Principal(id=principal_id(raw_key), open_mode=True, admin=True)
        digest = hash_key(raw_key, self._salt)
        principal = self._principals_by_hash.get(digest)
        if principal is None:
            raise NotAuthorizedException(detail="invalid API key: it is not one of this server's keys")
        return Principal(id=principal, admin=principal in self.admins)


def caller_id(request: Any) -> str:
    """The principal id of the request's authenticated caller (what every route's ``owner`` is)."""
    user: Principal = request.user
    return user.id


def request_key(headers: Any) -> str | None:
    """The API key a request carries: ``X-API-Key``, else ``Authorization: Bearer <key>`` (OpenAI clients)."""
    key = headers.get(API_KEY_HEADER)
    if key:
        return key
    scheme, _, bearer = (headers.get("authorization") or "").partition(" ")
    return (bearer.strip() or None) if scheme.lower() == "bearer" else None


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    """Litestar authentication middleware: sets ``request.user`` to the caller's ``Principal``. The key comes as
    ``X-API-Key``, or as ``Authorization: Bearer <key>``.

    Routes opt out with ``opt={"exclude_from_auth": True}`` (health checks); ``public`` names whole path
    prefixes served without a key (the OpenAPI docs), matched exactly from the app's root — never anywhere
    in a path. The key ring is read from ``app.state.keyring``, which the app's startup fills.
    """

    def __init__(self, app: ASGIApp, public: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.public = tuple(p.rstrip("/") for p in public)

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        if self.public and self._is_public(connection.scope):
            return AuthenticationResult(user=None, auth=None)
        keyring: KeyRing | None = getattr(connection.app.state, "keyring", None)
        if keyring is None:
            raise ServiceUnavailableException(detail="the server is still starting; retry in a moment")
        principal = keyring.authenticate(request_key(connection.headers))
        return AuthenticationResult(user=principal, auth=None)

    def _is_public(self, scope: Any) -> bool:
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return any(path == p or path.startswith(p + "/") for p in self.public)
