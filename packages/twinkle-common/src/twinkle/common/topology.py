"""What a Ray cluster looks like, as far as GPU placement is concerned.

A :class:`Topology` is a plain list of Ray nodes. It comes from one of two places:

- a YAML/JSON file (:func:`load_topology`), so that a placement can be planned and checked before any
  cluster exists (``twinkle-server plan --topology cluster.yaml``), and so that tests need no Ray;
- the live cluster (:func:`read_ray_topology`), which asks Ray for its nodes and probes every GPU node for the
  ``CUDA_VISIBLE_DEVICES`` its ``ray start`` ran with.

Why the probe: Ray numbers a node's GPUs 0..n-1 no matter which physical devices they are. The seed's recipe
runs one 8-GPU machine as two Ray nodes (``CUDA_VISIBLE_DEVICES=0,1,2,3`` and ``=4,5,6,7``), so "GPU 1 of node B"
is physical GPU 5. ``ranks`` in the YAML are physical ids, so the planner has to know each node's list.
Ray does not report it, but a task started with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1`` keeps the
raylet's environment untouched and can read it.

Machines are Ray nodes grouped by IP (several Ray nodes on one host share the node manager address). How they
are numbered is the placement's business, see :mod:`twinkle.common.placement`; :meth:`Topology.machines`
implements that order so that the planner, the plan table and the docs agree on one rule.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

__all__ = [
    "Machine",
    "RayNode",
    "Topology",
    "TopologyError",
    "load_topology",
    "parse_visible_devices",
    "read_ray_topology",
    "topology_from_dict",
]


class TopologyError(ValueError):
    """A topology file is malformed, or the live cluster could not be read."""


class RayNode(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One Ray node (one raylet).

    ``num_gpus`` counts the node's accelerators (Ray's ``GPU`` resource, or ``NPU`` on Ascend clusters).
    ``visible_gpus`` is the device list the node's ``ray start`` ran with (``CUDA_VISIBLE_DEVICES``);
    None means the variable was not set, i.e. the node owns devices ``0..num_gpus-1``.
    """

    node_id: str
    ip: str
    is_head: bool = False
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    visible_gpus: tuple[int, ...] | None = None
    alive: bool = True

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        """The physical device ids this node hands out, in Ray's order (index i = Ray's GPU i).

        Ray uses the first ``num_gpus`` entries of ``CUDA_VISIBLE_DEVICES`` when the list is longer than
        ``--num-gpus``; fractional GPU counts only count whole devices.
        """
        count = int(self.num_gpus)
        if self.visible_gpus is None:
            return tuple(range(count))
        return tuple(self.visible_gpus[:count])

    @property
    def short_id(self) -> str:
        return self.node_id[:8]


class Machine(msgspec.Struct, frozen=True):
    """A physical host: the Ray nodes sharing one IP. ``index`` is its position in the machine order."""

    index: int
    ip: str
    nodes: tuple[RayNode, ...]

    @property
    def has_gpus(self) -> bool:
        """Whether any of its nodes, alive or not, was started with accelerators.

        Dead nodes count so that a machine whose GPU raylet died keeps its number (and its ranks report
        "node not alive") instead of silently shifting every later machine.
        """
        return any(node.gpu_ids for node in self.nodes)

    @property
    def is_head(self) -> bool:
        return any(node.is_head for node in self.nodes)

    def gpu_owners(self, *, alive: bool = True) -> dict[int, list[RayNode]]:
        """Physical device id -> the nodes on this machine that claim it (normally exactly one)."""
        owners: dict[int, list[RayNode]] = {}
        for node in self.nodes:
            if node.alive != alive:
                continue
            for gpu in node.gpu_ids:
                owners.setdefault(gpu, []).append(node)
        return owners


def _ip_sort_key(ip: str) -> tuple[int, int, str]:
    """Numeric order for IPs (IPv4 before IPv6); anything that is not an IP (a hostname) sorts last by name."""
    try:
        address = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return (99, 0, ip)
    return (address.version, int(address), ip)


class Topology(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The Ray nodes of a cluster, alive and dead (Ray keeps dead nodes listed for a while)."""

    nodes: tuple[RayNode, ...]

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for node in self.nodes:
            if node.node_id in seen:
                raise TopologyError(f"node_id {node.node_id!r} appears twice in the topology")
            seen.add(node.node_id)
            if node.num_gpus < 0 or node.num_cpus < 0:
                raise TopologyError(f"node {node.node_id}: num_gpus and num_cpus must be >= 0")
            if node.visible_gpus is not None:
                if any(gpu < 0 for gpu in node.visible_gpus):
                    raise TopologyError(f"node {node.node_id}: visible_gpus must be non-negative device ids")
                if len(set(node.visible_gpus)) != len(node.visible_gpus):
                    raise TopologyError(f"node {node.node_id}: visible_gpus lists a device twice")
        heads = [node.node_id for node in self.nodes if node.is_head and node.alive]
        if len(heads) > 1:
            raise TopologyError(f"more than one alive head node: {', '.join(heads)}")

    @property
    def alive_nodes(self) -> tuple[RayNode, ...]:
        return tuple(node for node in self.nodes if node.alive)

    @property
    def head(self) -> RayNode | None:
        return next((node for node in self.nodes if node.is_head and node.alive), None)

    @property
    def total_gpus(self) -> int:
        """Whole accelerators on alive nodes."""
        return sum(len(node.gpu_ids) for node in self.alive_nodes)

    def node(self, node_id: str) -> RayNode:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(node_id)

    def machines(self) -> tuple[Machine, ...]:
        """Ray nodes grouped by IP, in the machine order that physical ranks use.

        Machines with accelerators come first, CPU-only ones after (they host no ranks, so a CPU-only head
        box does not shift rank 0 off the GPUs). Within each group the machine that hosts the Ray head comes
        first and the others follow in ascending numeric IP order (IPv4 before IPv6, hostnames last).
        Nodes inside a machine are listed head first, then by their lowest device id, then by node id.
        """
        by_ip: dict[str, list[RayNode]] = {}
        for node in self.nodes:
            by_ip.setdefault(node.ip, []).append(node)

        def node_key(node: RayNode) -> tuple[bool, int, str]:
            return (not node.is_head, min(node.gpu_ids, default=1 << 30), node.node_id)

        groups = [(ip, tuple(sorted(nodes, key=node_key))) for ip, nodes in by_ip.items()]

        def machine_key(group: tuple[str, tuple[RayNode, ...]]) -> tuple[bool, bool, tuple[int, int, str]]:
            ip, nodes = group
            has_gpus = any(node.gpu_ids for node in nodes)
            hosts_head = any(node.is_head and node.alive for node in nodes)
            return (not has_gpus, not hosts_head, _ip_sort_key(ip))

        ordered = sorted(groups, key=machine_key)
        return tuple(Machine(index=i, ip=ip, nodes=nodes) for i, (ip, nodes) in enumerate(ordered))

    def to_dict(self) -> dict[str, Any]:
        """The file form read by :func:`load_topology` (round-trips)."""
        return {"nodes": [msgspec.to_builtins(node) for node in self.nodes]}


def parse_visible_devices(value: str | None, *, where: str = "CUDA_VISIBLE_DEVICES") -> tuple[int, ...] | None:
    """Parse a ``CUDA_VISIBLE_DEVICES``-style string: None stays None (unset), ``""`` is no device at all.

    Device UUIDs (``GPU-8f…``) and MIG ids cannot be mapped to physical ranks, so they are rejected with a
    hint instead of being guessed at.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return ()
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            ids.append(int(part))
        except ValueError:
            raise TopologyError(
                f"{where}={value!r}: {part!r} is not an integer device index. Start Ray with integer "
                "indices (e.g. CUDA_VISIBLE_DEVICES=4,5,6,7), not device UUIDs or MIG ids."
            ) from None
    return tuple(ids)


def _node_from_mapping(raw: Any, index: int) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise TopologyError(f"nodes[{index}]: expected a mapping, got {type(raw).__name__}")
    entry = dict(raw)
    entry.setdefault("node_id", f"node-{index}")
    visible = entry.get("visible_gpus")
    if isinstance(visible, (str, int)) and not isinstance(visible, bool):
        entry["visible_gpus"] = parse_visible_devices(str(visible), where=f"nodes[{index}].visible_gpus")
    return entry


def topology_from_dict(data: Any) -> Topology:
    """Build a topology from the file form: ``{"nodes": [{node_id?, ip, is_head?, num_cpus?, num_gpus?,
    visible_gpus?, alive?}, ...]}``. ``visible_gpus`` may be a list or a ``"0,1,2,3"`` string; a missing
    ``node_id`` becomes ``node-<i>``. Unknown keys are rejected with their path."""
    if not isinstance(data, Mapping) or "nodes" not in data:
        raise TopologyError("a topology must be a mapping with a 'nodes' list")
    nodes = data["nodes"]
    if not isinstance(nodes, list):
        raise TopologyError("'nodes' must be a list")
    prepared = {**data, "nodes": [_node_from_mapping(raw, i) for i, raw in enumerate(nodes)]}
    try:
        return msgspec.convert(prepared, Topology, strict=True)
    except msgspec.ValidationError as exc:
        raise TopologyError(f"invalid topology: {exc}") from None


def load_topology(path: str | os.PathLike[str]) -> Topology:
    """Read a topology file (``.json`` as JSON, anything else as YAML)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"cannot read topology file {file}: {exc}") from None
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise TopologyError(
            f"{file}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'}: {exc}"
        ) from None
    try:
        return topology_from_dict(data)
    except TopologyError as exc:
        raise TopologyError(f"{file}: {exc}") from None


# --- live cluster -------------------------------------------------------------------------------------------

_ACCELERATOR_ENV = {"GPU": "CUDA_VISIBLE_DEVICES", "NPU": "ASCEND_RT_VISIBLE_DEVICES"}
_HEAD_RESOURCE = "node:__internal_head__"


def _probe_env(name: str) -> str | None:
    return os.environ.get(name)


def read_ray_topology(*, accelerator: str = "GPU", probe_timeout_s: float = 60.0) -> Topology:
    """Read the live topology from the Ray cluster this process is connected to (``ray.init`` first).

    Every alive node with accelerators gets a zero-CPU probe task pinned to it (hard node affinity) whose
    runtime env sets ``RAY_EXPERIMENTAL_NOSET_<ENV>=1``; Ray then leaves the worker's environment as the
    raylet's, so the task reads what ``ray start`` was run with. The probes run in parallel; a node that
    cannot run one within ``probe_timeout_s`` is an error naming that node (a wedged raylet would otherwise
    give a plan that fails later, on that node).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if accelerator not in _ACCELERATOR_ENV:
        raise TopologyError(f"accelerator must be one of {sorted(_ACCELERATOR_ENV)}, got {accelerator!r}")
    if not ray.is_initialized():
        raise TopologyError("Ray is not initialized: call ray.init(address=...) before read_ray_topology()")
    env_name = _ACCELERATOR_ENV[accelerator]

    nodes: list[dict[str, Any]] = []
    for info in ray.nodes():
        resources = info.get("Resources") or {}
        nodes.append(
            {
                "node_id": info["NodeID"],
                "ip": info.get("NodeManagerAddress") or "",
                "is_head": _HEAD_RESOURCE in resources or bool(info.get("IsHeadNode", False)),
                "num_cpus": float(resources.get("CPU", 0.0)),
                "num_gpus": float(resources.get(accelerator, 0.0)),
                "alive": bool(info.get("Alive", False)),
                "visible_gpus": None,
            }
        )

    probe = ray.remote(num_cpus=0)(_probe_env)
    pending = {}
    for entry in nodes:
        if entry["alive"] and entry["num_gpus"] >= 1:
            pending[entry["node_id"]] = probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=entry["node_id"], soft=False),
                runtime_env={"env_vars": {f"RAY_EXPERIMENTAL_NOSET_{env_name}": "1"}},
                name="twinkle-topology-probe",
            ).remote(env_name)

    results = _gather_probes(ray, pending, probe_timeout_s)
    for entry in nodes:
        if entry["node_id"] in results:
            entry["visible_gpus"] = parse_visible_devices(
                results[entry["node_id"]], where=f"{env_name} of Ray node {entry['node_id']} ({entry['ip']})"
            )
    return Topology(nodes=tuple(RayNode(**entry) for entry in nodes))


def _gather_probes(ray: Any, pending: Mapping[str, Any], timeout_s: float) -> dict[str, str | None]:
    if not pending:
        return {}
    refs = list(pending.values())
    ready, not_ready = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if not_ready:
        stuck = [node_id for node_id, ref in pending.items() if ref in not_ready]
        for ref in not_ready:
            ray.cancel(ref, force=True)
        raise TopologyError(
            f"the device probe did not finish within {timeout_s:.0f}s on Ray node(s) {', '.join(stuck)}; "
            "check that those raylets are healthy (ray status) and can start workers"
        )
    return {node_id: ray.get(ref) for node_id, ref in pending.items()}
