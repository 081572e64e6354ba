"""What the settings of both central apps share (``TinkerSettings``, ``NativeSettings``): both servers keep the
same store, keys and checkpoint layout, so a deployment can switch protocols."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import msgspec
from twinkle.common.limits import RequestLimits

MiB = 1024 * 1024

S = TypeVar("S", bound="CentralSettings")


class CentralSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """The fields, checks and constructors common to both protocols' central apps."""

    checkpoint_dir: str
    """A directory every node sees (model workers write there, samplers read there)."""
    state_db: str = ""
    """SQLite file of the durable store; empty = ``<checkpoint_dir>/twinkle-state.sqlite``."""
    host: str = "127.0.0.1"
    """The address the HTTP server binds; decides whether running without API keys is allowed."""
    api_keys: list[str] = []
    """Accepted ``X-API-Key`` values (plus ``TWINKLE_API_KEYS``); none on loopback = open mode."""
    admin_keys: list[str] = []
    """Keys with the admin role (plus ``TWINKLE_ADMIN_KEYS``): accepted like ``api_keys``, and they may also
    read every tenant's usage and the services' internals (``GET …/admin/usage``, ``…/admin/services``)."""
    supported_models: list[str] | None = None
    """Base models clients may use; None = every model given to the app."""
    session_timeout_s: float = 120.0
    """A session without heartbeat for this long is closed."""
    long_poll_timeout_s: float = 25.0
    """Longest a wait for a future is held before answering that it is still pending."""
    future_ttl_s: float = 86400.0
    """How long a finished request's result is kept when nobody fetches it."""
    fetched_result_ttl_s: float = 900.0
    """How long a result stays retrievable after its first fetch (a client may re-fetch after a network error)."""
    sweep_interval_s: float = 30.0
    """How often expired checkpoints, old results and silent sessions are cleaned up."""
    limits: RequestLimits = RequestLimits()
    """Bounds on every request (``twinkle.common.limits``), checked before any work and advertised."""
    max_pending_per_key: int = 256
    """Requests one API key may have queued or running at once; past it, 429 with Retry-After."""
    max_polls_per_key: int = 64
    """Long-polls one API key may hold open at once; past it, 429 (polls must not fill the server's slots)."""
    max_sessions_per_key: int = 256
    """Open sessions one API key may hold; past it, 429 until some finish or time out."""
    max_checkpoints_per_key: int = 10000
    """Checkpoints one API key may keep (named ones; ephemeral sampler weights are trimmed per run)."""
    max_checkpoint_bytes_per_key: int = 1 << 40
    """Bytes of checkpoints one API key may keep; a save past it is refused until checkpoints are deleted."""
    audit_retention_s: float = 90 * 86400.0
    """How long audit log entries are kept (90 days)."""
    usage_retention_s: float = 400 * 86400.0
    """How long hourly usage buckets are kept (400 days: a year of monthly reports)."""
    replica_wait_s: float = 45.0
    """How long a numbered request whose model replica died waits for a new replica before it fails."""

    def __post_init__(self) -> None:
        if not self.checkpoint_dir:
            raise ValueError("checkpoint_dir is required")

    @property
    def state_path(self) -> str:
        return self.state_db or os.path.join(self.checkpoint_dir, "twinkle-state.sqlite")

    @classmethod
    def from_server_args(cls: type[S], args: dict[str, Any] | None, *, checkpoint_dir: str, state_db: str = "",
                         host: str = "127.0.0.1") -> S:
        """Build from the ``server`` application's validated ``args`` plus the launcher's storage paths."""
        values = {k: v for k, v in (args or {}).items() if v is not None}
        values.update(checkpoint_dir=checkpoint_dir, state_db=state_db or "", host=host)
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid server args: {e}") from None
