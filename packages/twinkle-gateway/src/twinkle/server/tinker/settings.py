"""Settings of the Tinker-compatible central app."""

from __future__ import annotations

import os
from typing import Any

import msgspec

MiB = 1024 * 1024


class TinkerSettings(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything ``create_tinker_app`` needs besides the ports.

    ``checkpoint_dir`` must be a directory every node sees (model workers write there, samplers read there).
    """

    checkpoint_dir: str
    state_db: str = ""
    """SQLite file of the durable store; empty = ``<checkpoint_dir>/twinkle-state.sqlite``."""
    host: str = "127.0.0.1"
    """The address the HTTP server binds; decides whether running without API keys is allowed."""
    api_keys: list[str] = []
    """Accepted ``X-API-Key`` values (plus ``TWINKLE_API_KEYS``); none on loopback = open mode."""
    supported_models: list[str] | None = None
    """Base models clients may use; None = every model given to the app."""
    session_timeout_s: float = 120.0
    """A session without heartbeat for this long is closed (the SDK beats every 10 s)."""
    long_poll_timeout_s: float = 25.0
    """How long ``retrieve_future`` holds a poll before ``try_again`` (the SDK's read timeout is 45 s)."""
    future_ttl_s: float = 86400.0
    """How long a finished request's result is kept when nobody fetches it."""
    fetched_result_ttl_s: float = 900.0
    """How long a result stays retrievable after its first fetch (the SDK may re-fetch after a network error)."""
    max_body_bytes: int = 64 * MiB
    """Largest accepted request body, after decompression; larger ones get 413."""
    sweep_interval_s: float = 30.0
    """How often expired checkpoints, old results and closed sessions are cleaned up."""
    ephemeral_keep: int = 8
    """Ephemeral sampler weights (``save_weights_and_get_sampling_client``) kept per training run."""
    ephemeral_ttl_s: float = 3600.0
    """Ephemeral weights of a closed session are deleted when unused for this long."""

    def __post_init__(self) -> None:
        if not self.checkpoint_dir:
            raise ValueError("checkpoint_dir is required")
        if not 0 < self.long_poll_timeout_s < 45:
            raise ValueError("long_poll_timeout_s must be between 0 and the SDK's 45 s read timeout")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")

    @property
    def state_path(self) -> str:
        return self.state_db or os.path.join(self.checkpoint_dir, "twinkle-state.sqlite")

    @classmethod
    def from_server_args(cls, args: dict[str, Any] | None, *, checkpoint_dir: str, state_db: str = "",
                         host: str = "127.0.0.1") -> "TinkerSettings":
        """Build from the ``server`` application's validated ``args`` plus the launcher's storage paths."""
        values = {k: v for k, v in (args or {}).items() if v is not None}
        values.update(checkpoint_dir=checkpoint_dir, state_db=state_db or "", host=host)
        try:
            return msgspec.convert(values, cls)
        except msgspec.ValidationError as e:
            raise ValueError(f"invalid server args: {e}") from None
