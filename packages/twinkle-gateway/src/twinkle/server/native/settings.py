"""Settings of the native Twinkle central app (TwinkleServer)."""

from __future__ import annotations

from ..core.settings import MiB, CentralSettings


class NativeSettings(CentralSettings, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What ``NativeService`` needs besides its ports. The shared fields (``CentralSettings``) mean what they
    mean in ``TinkerSettings``."""

    heartbeat_interval_s: float = 10.0
    """How often clients are told to beat."""
    max_body_bytes: int = 8 * MiB
    """Largest accepted request body on the central app (it receives no training data)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.long_poll_timeout_s <= 0:
            raise ValueError("long_poll_timeout_s must be positive")
        if not 0 < self.heartbeat_interval_s < self.session_timeout_s:
            raise ValueError("heartbeat_interval_s must be positive and below session_timeout_s")
