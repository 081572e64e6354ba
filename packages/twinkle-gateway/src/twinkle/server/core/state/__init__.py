"""Durable server state (sessions, training runs, checkpoints, sampling sessions, futures, API keys, sampled
sequences recorded for ``stable_reinforce``),
shared by the Tinker-compatible app and the native Twinkle server."""

from .records import (
    ApiKeyRecord,
    CheckpointRecord,
    FutureRecord,
    Page,
    RunRecord,
    SamplerRecord,
    SequenceRecord,
    SessionRecord,
)
from .store import Store

__all__ = [
    "ApiKeyRecord",
    "CheckpointRecord",
    "FutureRecord",
    "Page",
    "RunRecord",
    "SamplerRecord",
    "SequenceRecord",
    "SessionRecord",
    "Store",
]
