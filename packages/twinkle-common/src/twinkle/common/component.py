"""What the launcher hands to each component's Serve deployment: everything it needs to start, as data.

Ray pickles this into the replica, so it is a plain msgspec struct; the component reads its own ``args``
back into its typed config struct.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .config.schema import HttpOptions
from .workers import WorkerSpec


class ComponentSpec(msgspec.Struct, frozen=True):
    app_name: str
    route_prefix: str
    import_path: str  # server | model | sampler | processor
    server_type: str  # twinkle | tinker
    args: dict[str, Any]  # the application's validated ``args``, as plain data
    workers: list[WorkerSpec] = []
    checkpoint_dir: str = ""
    state_db: str = ""
    # For the central server: the other applications it fronts.
    peers: list["PeerApp"] = []
    http_host: str = "127.0.0.1"
    # For a model/sampler/processor: the central server application, which authenticates their callers and
    # keeps their checkpoints' records (reached through a Serve handle; see ``twinkle.common.authority``).
    central: "PeerApp | None" = None
    # The most replicas Serve may run of this application (the YAML's num_replicas or autoscaling max).
    max_replicas: int = 1
    # For the central server under ``ingress: gateway``: it answers HTTP itself, where this says.
    listen: "Listen | None" = None


class Listen(msgspec.Struct, frozen=True):
    """The ``http_options`` the central server's replica serves HTTP with (``ingress: gateway``), and the
    machine it must run on: the launcher's, whose address the YAML's ``host`` names (``node_ip``: the address
    its raylet registered)."""

    http_options: HttpOptions
    node_ip: str


class PeerApp(msgspec.Struct, frozen=True):
    """A model/sampler/processor application as the central server sees it."""

    app_name: str
    deployment_name: str
    import_path: str
    route_prefix: str
    model_name: str | None = None  # served base-model name (model and sampler apps)
    model_id: str | None = None
