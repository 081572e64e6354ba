"""Settings of the Tinker-compatible central app."""

from __future__ import annotations

from ..core.settings import MiB, CentralSettings


class TinkerSettings(CentralSettings, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Everything ``create_tinker_app`` needs besides the ports (the shared fields: ``CentralSettings``).

    The official SDK beats every 10 s (``session_timeout_s``), and its read timeout of 45 s bounds
    ``long_poll_timeout_s`` (how long ``retrieve_future`` holds a poll before ``try_again``).
    """

    max_body_bytes: int = 64 * MiB
    """Largest accepted request body, after decompression; larger ones get 413."""
    ephemeral_keep: int = 8
    """Ephemeral sampler weights (``save_weights_and_get_sampling_client``) kept per training run."""
    ephemeral_ttl_s: float = 3600.0
    """Ephemeral weights of a closed session are deleted when unused for this long."""
    compress_forward_backward: bool = True
    """Ask the SDK to zstd-compress forward_backward bodies: 29-44% of the bytes for ~5 ms of CPU per 0.5 MiB
    (``bench/fwdbwd_compression.py``), a gain below ~500 Mbit/s; turn off when clients share the server's host."""
    download_url_ttl_s: float = 3600.0
    """How long the signed download URLs of exported weights (``external_weights_urls``) stay valid."""
    recorded_sequence_ttl_s: float = 86400.0
    """Sequences sampled with ``record_stability_info`` are kept this long after their last use (Tinker: a day)."""
    max_recorded_sequences_per_key: int = 100_000
    """Recorded sequences one API key keeps; past it, its least recently used ones are dropped."""
    max_recorded_tokens_per_key: int = 20_000_000
    """Sampled tokens of the recorded sequences one API key keeps (~160 MB with their logprobs); past it, its
    least recently used sequences are dropped."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.long_poll_timeout_s < 45:
            raise ValueError("long_poll_timeout_s must be between 0 and the SDK's 45 s read timeout")
        if self.max_body_bytes <= 0:
            raise ValueError("max_body_bytes must be positive")
        if self.download_url_ttl_s <= 0:
            raise ValueError("download_url_ttl_s must be positive")
        if (self.recorded_sequence_ttl_s <= 0 or self.max_recorded_sequences_per_key < 1
                or self.max_recorded_tokens_per_key < 1):
            raise ValueError("recorded_sequence_ttl_s and max_recorded_sequences_per_key must be positive")
