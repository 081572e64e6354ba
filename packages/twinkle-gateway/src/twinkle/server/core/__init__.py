"""The protocol-neutral core of the central server: one ``ControlPlane`` under both protocol surfaces.

=====================  ==============================================================================
``control``            ``ControlPlane``: sessions, runs, numbered submissions, checkpoints, housekeeping
``futures``            durable futures (write before answering, dedupe on ``(run, seq_id)``, long-poll)
``state``              the durable store (SQLite) and its records
``ports``              how the central app reaches the Model and Sampler services (in-process or a handle)
``checkpoints``        checkpoint URIs and the on-disk layout
``settings``           the settings both protocols' central apps share
=====================  ==============================================================================

Nothing here knows a wire format; ``twinkle.server.tinker`` and ``twinkle.server.native`` do.
"""

from .checkpoints import CheckpointLayout, CheckpointRef
from .control import REFUSED, ControlPlane, Gone, iso, not_expired
from .futures import Busy, Futures, result_value
from .ports import HandlePort, LocalPort, ModelPort, SamplerPort
from .settings import CentralSettings

__all__ = [
    "Busy", "CentralSettings", "CheckpointLayout", "CheckpointRef", "ControlPlane", "Futures", "Gone", "HandlePort",
    "LocalPort", "ModelPort", "REFUSED", "SamplerPort", "iso", "not_expired", "result_value",
]
