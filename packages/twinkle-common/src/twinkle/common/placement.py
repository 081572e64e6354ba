"""Physical GPU ranks -> machines -> Ray nodes -> ``CUDA_VISIBLE_DEVICES``: one allocator for the whole cluster.

The YAML names GPUs by *physical rank* (``ranks: [4, 5]`` means GPUs 4 and 5 of the machine, whichever Ray
node owns them). This module turns every application's ranks into concrete workers before anything starts, as
a pure function over a :class:`~twinkle.common.topology.Topology`, so that it can be tested and dry-run
without Ray (``twinkle-server plan --topology file.yaml``). Upstream Twinkle resolves ranks inside each
replica against "logical nodes" and lets Ray pick the devices, so two deployments can land on the same GPU and a
mesh that does not fit fails deep inside a backend; here every conflict is an error that names the application,
the GPU and the fix. Two applications may share a GPU only when the caller says so (``allow_shared_gpus``).

Machine order (the rule that maps a rank to a host)
---------------------------------------------------
Ray nodes are grouped into machines by IP. Machines with accelerators are numbered first: the machine that
hosts the Ray head is machine 0, the others follow in ascending numeric IP order (IPv4 before IPv6, hostnames
last). Machines without any accelerator are numbered after them and never host ranks, so a CPU-only head box
does not move rank 0 away from the GPUs. Global physical rank ``r`` is local device ``r % D`` on machine
``r // D``, where ``D`` is ``DEVICE_COUNT_PER_PHYSICAL_NODE``. On that machine the alive Ray node whose
``CUDA_VISIBLE_DEVICES`` (``visible_gpus``) contains the local device owns it; the worker gets that node and
``CUDA_VISIBLE_DEVICES=<local device>`` (the physical id; Ray is told not to rewrite it).

``D`` may be left unset only while at most one machine has GPUs: it is then inferred as the highest device id
on that machine plus one (so a machine run as ``0-3`` and ``4-7`` nodes gives 8), and the plan says so in its
notes. With several GPU machines a missing ``D`` is an error, because a rank cannot be mapped to a machine.

Worker counts
-------------
- GPU groups (``model``/``sampler`` with ``device_type`` cuda or npu): one worker per rank. ``nproc_per_node``
  must divide the number of ranks and the mesh size (dp*tp*pp*cp, the config's ``world_size``) must equal it.
- CPU groups (``processor``, any ``device_type: cpu``, or an app without ``device_group``): ``world_size`` or
  ``ncpu_proc_per_node`` or 1 workers, ``ncpu_proc_per_node`` of them per Ray node (all on one node when it is
  unset). Nodes are taken in this order: alive nodes without GPUs, then the head, then the other GPU nodes.
  CPU slots are numbered per node across all applications; more slots than a node's CPUs is a note, not an
  error, because CPU workers are light and their Ray CPU request is the service's choice.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from twinkle.common.topology import Machine, RayNode, Topology

__all__ = [
    "DEVICE_COUNT_ENV",
    "ComponentRequest",
    "PlacementError",
    "PlacementPlan",
    "WorkerPlacement",
    "device_count_from_env",
    "plan_for_config",
    "plan_placement",
    "requests_from_config",
]

DEVICE_COUNT_ENV = "DEVICE_COUNT_PER_PHYSICAL_NODE"

_VISIBLE_ENV = {"cuda": "CUDA_VISIBLE_DEVICES", "npu": "ASCEND_RT_VISIBLE_DEVICES"}
_GPU_TYPES = frozenset(_VISIBLE_ENV)


class PlacementError(ValueError):
    """The requested placement cannot work on this cluster. ``problems`` lists every reason found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"placement failed: {self.problems[0]}"
        else:
            message = "placement failed:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


@dataclass(frozen=True)
class ComponentRequest:
    """What one application asks for, independent of the config classes that describe it.

    ``ranks`` are physical GPU ranks (ignored for CPU groups); ``world_size`` is the device mesh size
    (the config's ``device_mesh.world_size``) or None when the application has no mesh.
    """

    app_name: str
    import_path: str
    device_type: str
    ranks: tuple[int, ...] = ()
    nproc_per_node: int = 1
    world_size: int | None = None
    ncpu_proc_per_node: int | None = None
    mesh: tuple[int, int, int] | None = None  # (dp_size, tp_size, pp_size) when model parallel

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranks", tuple(self.ranks))
        object.__setattr__(self, "device_type", self.device_type.lower())

    @property
    def uses_gpus(self) -> bool:
        """Processors are CPU work whatever their device_group says; other apps follow device_type."""
        return self.import_path != "processor" and self.device_type in _GPU_TYPES


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker of one application runs.

    GPU workers carry ``rank`` (the physical rank from the YAML), ``device`` (the physical device id on the
    machine, which becomes ``CUDA_VISIBLE_DEVICES``), ``node_gpu_index`` (the device's position in the Ray
    node's GPU list, i.e. Ray's own GPU number) and ``gpu_fraction`` (the ``num_gpus`` to ask Ray for: 1, or
    1/k when k workers share the GPU). CPU workers carry ``cpu_slot``.
    """

    app_name: str
    worker_index: int
    node_id: str
    node_ip: str
    machine_index: int
    device_type: str
    rank: int | None = None
    device: int | None = None
    node_gpu_index: int | None = None
    cpu_slot: int | None = None
    gpu_fraction: float | None = None
    mesh: str | None = None  # e.g. "dp0 tp1 pp0": the worker's place in a model-parallel mesh

    def __post_init__(self) -> None:
        if self.device is not None and self.gpu_fraction is None:
            object.__setattr__(self, "gpu_fraction", 1.0)

    @property
    def is_gpu(self) -> bool:
        return self.device is not None

    @property
    def visible_devices_env(self) -> str | None:
        """The variable to set (``CUDA_VISIBLE_DEVICES`` or ``ASCEND_RT_VISIBLE_DEVICES``), None on CPU."""
        return _VISIBLE_ENV.get(self.device_type) if self.is_gpu else None

    @property
    def visible_devices(self) -> str | None:
        return str(self.device) if self.is_gpu else None

    @property
    def env(self) -> dict[str, str]:
        """Environment the worker must start with. Ray must also be told not to overwrite it
        (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1``); that is the launcher's part."""
        name = self.visible_devices_env
        return {name: str(self.device)} if name else {}

    @property
    def device_label(self) -> str:
        if not self.is_gpu:
            return f"cpu slot {self.cpu_slot}"
        share = "" if self.gpu_fraction == 1.0 else f" ({self.gpu_fraction:.2g} shared)"
        return f"{self.device_type}:{self.device}{share}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "app_name": self.app_name,
            "worker_index": self.worker_index,
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "machine_index": self.machine_index,
            "device_type": self.device_type,
            "rank": self.rank,
            "device": self.device,
            "node_gpu_index": self.node_gpu_index,
            "cpu_slot": self.cpu_slot,
            "gpu_fraction": self.gpu_fraction,
            "mesh": self.mesh,
            "env": self.env,
        }


@dataclass(frozen=True)
class PlacementPlan:
    """Every worker of every application, plus the notes an operator should read (inferred values etc.)."""

    workers: tuple[WorkerPlacement, ...]
    notes: tuple[str, ...] = ()
    device_count_per_physical_node: int | None = None
    machines: tuple[Machine, ...] = field(default=(), repr=False)

    @property
    def apps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(w.app_name for w in self.workers))

    def by_app(self, name: str) -> list[WorkerPlacement]:
        """The workers of one application in worker order; KeyError for an application not in the plan."""
        found = [w for w in self.workers if w.app_name == name]
        if not found:
            raise KeyError(f"no application {name!r} in the plan (have: {', '.join(self.apps) or 'none'})")
        return found

    def gpus_by_node(self) -> dict[str, list[int]]:
        """Ray node id -> the distinct physical device ids planned on it: how many GPUs to reserve where."""
        result: dict[str, list[int]] = {}
        for worker in self.workers:
            if worker.is_gpu and worker.device not in result.setdefault(worker.node_id, []):
                result[worker.node_id].append(worker.device)  # type: ignore[arg-type]
        return result

    def format_table(self, *, include_notes: bool = True) -> str:
        """An aligned text table, one line per worker, followed by the notes."""
        env_header = next((w.visible_devices_env for w in self.workers if w.is_gpu), None) or "CUDA_VISIBLE_DEVICES"
        meshed = any(w.mesh for w in self.workers)
        header = ("app", "worker", "rank", "machine", "ray node", "device", env_header) + (("mesh",) if meshed else ())
        rows = [
            (
                w.app_name,
                str(w.worker_index),
                "-" if w.rank is None else str(w.rank),
                str(w.machine_index),
                f"{w.node_id[:8]} ({w.node_ip})",
                w.device_label,
                w.visible_devices or "-",
            ) + ((w.mesh or "-",) if meshed else ())
            for w in self.workers
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

        out = [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]
        if include_notes and self.notes:
            out.append("")
            out.extend(f"note: {note}" for note in self.notes)
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_count_per_physical_node": self.device_count_per_physical_node,
            "machines": [{"index": m.index, "ip": m.ip, "nodes": [n.node_id for n in m.nodes]} for m in self.machines],
            "workers": [w.to_dict() for w in self.workers],
            "notes": list(self.notes),
        }


# --- config adapter -----------------------------------------------------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Attribute or mapping lookup: the config classes are structs, but ``args`` of unknown apps may be dicts."""
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def mesh_coordinates(worker: int, tp_size: int, dp_size: int, pp_size: int) -> tuple[int, int, int]:
    """(dp, tp, pp) rank of a mesh's ``worker``-th worker, in megatron-core's order (``initialize_model_parallel``
    with context and expert parallelism 1): TP ranks adjacent, then data-parallel replicas, then stages."""
    return (worker // tp_size) % dp_size, worker % tp_size, worker // (tp_size * dp_size)


def _mesh_label(worker: int, mesh: tuple[int, int, int] | None) -> str | None:
    if mesh is None:
        return None
    dp, tp, pp = mesh
    d, t, p = mesh_coordinates(worker, tp, dp, pp)
    return f"dp{d} tp{t} pp{p}"


def _model_parallel(mesh: Any) -> tuple[int, int, int] | None:
    """(dp, tp, pp) sizes of a mesh that splits the model (tp or pp > 1); None otherwise, and for context or
    expert parallelism, which no backend runs (``check_supported`` refuses them)."""
    if mesh is None or int(_get(mesh, "cp_size") or 1) > 1 or int(_get(mesh, "ep_size") or 1) > 1:
        return None
    dp, tp, pp = (int(_get(mesh, key) or 1) for key in ("dp_size", "tp_size", "pp_size"))
    return (dp, tp, pp) if tp * pp > 1 else None


def _mesh_size(mesh: Any) -> int | None:
    if mesh is None:
        return None
    size = _get(mesh, "world_size")
    if size is not None:
        return int(size)
    return math.prod(int(_get(mesh, key) or 1) for key in ("dp_size", "tp_size", "pp_size", "cp_size"))


def _ranks(value: Any) -> tuple[int, ...]:
    """``ranks: N`` (an int, as upstream allows) means ``0..N-1``; a list is taken as is."""
    if value is None:
        return ()
    if isinstance(value, int) and not isinstance(value, bool):
        return tuple(range(value))
    return tuple(int(r) for r in value)


def requests_from_config(cfg: Any) -> list[ComponentRequest]:
    """One request per application that runs workers (the ``server`` app has none).

    Reads ``applications[*].{name, import_path, args.{nproc_per_node, ncpu_proc_per_node, device_group,
    device_mesh}}`` by name, so it works on the typed config and on plain dicts alike. An application without
    ``device_group`` is a CPU group.
    """
    requests = []
    for app in _get(cfg, "applications") or ():
        import_path = str(_get(app, "import_path"))
        if import_path == "server":
            continue
        args = _get(app, "args")
        group = _get(args, "device_group")
        device_type = "cpu" if group is None else str(_get(group, "device_type") or "cuda")
        requests.append(
            ComponentRequest(
                app_name=str(_get(app, "name")),
                import_path=import_path,
                device_type=device_type,
                ranks=_ranks(_get(group, "ranks")),
                nproc_per_node=int(_get(args, "nproc_per_node") or 1),
                world_size=_mesh_size(_get(args, "device_mesh")),
                ncpu_proc_per_node=_get(args, "ncpu_proc_per_node"),
                mesh=_model_parallel(_get(args, "device_mesh")),
            )
        )
    return requests


def plan_for_config(
    cfg: Any, topology: Topology, device_count_per_physical_node: int | None, *, allow_shared_gpus: bool = False
) -> PlacementPlan:
    return plan_placement(
        requests_from_config(cfg), topology, device_count_per_physical_node, allow_shared_gpus=allow_shared_gpus
    )


def device_count_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """``DEVICE_COUNT_PER_PHYSICAL_NODE`` as an int, None when unset or empty."""
    raw = (os.environ if environ is None else environ).get(DEVICE_COUNT_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise PlacementError([f"{DEVICE_COUNT_ENV}={raw!r} is not an integer"]) from None
    if value <= 0:
        raise PlacementError([f"{DEVICE_COUNT_ENV}={value} must be a positive number of GPUs per machine"])
    return value


# --- planning -----------------------------------------------------------------------------------------------


def _ranges(ids: Sequence[int]) -> str:
    """``[0,1,2,3,8,9]`` -> ``"0-3, 8-9"``: compact lists for error messages."""
    values = sorted(set(ids))
    if not values:
        return "none"
    parts, start, prev = [], values[0], values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ", ".join(parts)


def _describe(node: RayNode) -> str:
    return f"Ray node {node.short_id} ({node.ip})"


def _validate_gpu_request(req: ComponentRequest) -> list[str]:
    app = f"application {req.app_name!r}"
    problems = []
    if not req.ranks:
        return [f"{app}: device_group.ranks is empty; list the physical GPU ids it should use, e.g. ranks: [0, 1]"]
    negative = [r for r in req.ranks if r < 0]
    if negative:
        problems.append(f"{app}: ranks must be physical GPU ids >= 0, got {negative}")
    duplicates = sorted({r for r in req.ranks if req.ranks.count(r) > 1})
    if duplicates:
        problems.append(f"{app}: rank(s) {_ranges(duplicates)} listed more than once in device_group.ranks")
    n = len(req.ranks)
    if req.nproc_per_node < 1 or n % req.nproc_per_node:
        problems.append(
            f"{app}: nproc_per_node={req.nproc_per_node} does not divide its {n} rank(s) {list(req.ranks)}; "
            f"use a divisor of {n} (one worker per GPU, nproc_per_node of them per machine)"
        )
    if req.world_size is not None and req.world_size != n:
        problems.append(
            f"{app}: device_mesh size {req.world_size} (the product of its parallel sizes) does not match its {n} "
            f"rank(s) {list(req.ranks)}; one worker runs per GPU rank, so make the product equal the number of ranks"
        )
    return problems


def _overlaps(requests: Sequence[ComponentRequest]) -> dict[tuple[str, str], list[int]]:
    """(first app, second app) -> the physical ranks both claim."""
    owner: dict[int, str] = {}
    clashes: dict[tuple[str, str], list[int]] = {}
    for req in requests:
        for rank in dict.fromkeys(req.ranks):
            first = owner.setdefault(rank, req.app_name)
            if first != req.app_name:
                clashes.setdefault((first, req.app_name), []).append(rank)
    return clashes


def _device_count(
    requests: Sequence[ComponentRequest], gpu_machines: Sequence[Machine], given: int | None, notes: list[str]
) -> int:
    """The D to use (an inferred one is added to ``notes``); PlacementError when it cannot be known."""
    if given is not None:
        if given <= 0:
            raise PlacementError([f"{DEVICE_COUNT_ENV}={given} must be a positive number of GPUs per machine"])
        return given
    if len(gpu_machines) > 1:
        apps = ", ".join(repr(r.app_name) for r in requests)
        ips = ", ".join(f"{m.index}: {m.ip}" for m in gpu_machines)
        raise PlacementError(
            [
                f"{DEVICE_COUNT_ENV} is not set, but {apps} use physical GPU ranks and {len(gpu_machines)} "
                f"machines have GPUs ({ips}), so a rank cannot be mapped to a machine; set it to the number of "
                f"GPUs in each machine, e.g. export {DEVICE_COUNT_ENV}=8"
            ]
        )
    machine = gpu_machines[0]
    inferred = max(gpu for node in machine.nodes for gpu in node.gpu_ids) + 1
    notes.append(
        f"{DEVICE_COUNT_ENV} is not set; inferred {inferred} from the only GPU machine {machine.ip} "
        "(highest device id + 1). Set it explicitly before adding machines."
    )
    return inferred


class _RankResolver:
    """Maps physical ranks to (machine, node, device), reporting each machine's setup problems once."""

    def __init__(self, machines: Sequence[Machine], device_count: int, inferred: bool) -> None:
        self._machines = [m for m in machines if m.has_gpus]
        self._d = device_count
        self._d_text = f"{DEVICE_COUNT_ENV}={device_count}" + (" inferred" if inferred else "")
        self._checked: set[int] = set()

    def available(self) -> list[int]:
        return [
            m.index * self._d + gpu
            for m in self._machines
            for gpu, owners in m.gpu_owners().items()
            if len(owners) == 1 and gpu < self._d
        ]

    def _machine_problems(self, machine: Machine) -> list[str]:
        if machine.index in self._checked:
            return []
        problems = []
        owners = machine.gpu_owners()
        shared = {gpu: nodes for gpu, nodes in owners.items() if len(nodes) > 1}
        if shared:
            names = sorted({_describe(n) for nodes in shared.values() for n in nodes})
            problems.append(
                f"machine {machine.index} ({machine.ip}): {' and '.join(names)} both claim GPU(s) "
                f"{_ranges(list(shared))}; start the Ray nodes of one machine with disjoint CUDA_VISIBLE_DEVICES, "
                "e.g. CUDA_VISIBLE_DEVICES=0,1,2,3 ray start ... --num-gpus=4 and "
                "CUDA_VISIBLE_DEVICES=4,5,6,7 ray start ... --num-gpus=4"
            )
        too_high = sorted(gpu for gpu in owners if gpu >= self._d)
        if too_high:
            problems.append(
                f"machine {machine.index} ({machine.ip}) has GPU id(s) {_ranges(too_high)} but "
                f"{DEVICE_COUNT_ENV}={self._d}; set it to the number of GPUs in each machine"
            )
        self._checked.add(machine.index)
        return problems

    def resolve(self, rank: int) -> tuple[Machine, RayNode, int] | list[str]:
        machine_index, device = divmod(rank, self._d)
        if machine_index >= len(self._machines):
            return [
                f"rank {rank} would be GPU {device} of machine {machine_index} ({self._d_text}), "
                f"but only {len(self._machines)} machine(s) have GPUs; ranks that exist: {_ranges(self.available())}"
            ]
        machine = self._machines[machine_index]
        problems = self._machine_problems(machine)
        owners = machine.gpu_owners().get(device, [])
        if len(owners) == 1:
            return problems or (machine, owners[0], device)
        if owners:
            return problems  # claimed twice: reported once by _machine_problems
        dead = machine.gpu_owners(alive=False).get(device)
        where = f"rank {rank} (GPU {device} of machine {machine.index}, {machine.ip})"
        if dead:
            problems.append(
                f"{where} belongs to {_describe(dead[0])}, which is not alive; restart that Ray node or choose "
                f"other ranks ({_ranges(self.available())} exist)"
            )
        else:
            held = ", ".join(
                f"{_describe(n)}: GPUs {_ranges(n.gpu_ids)}" for n in machine.nodes if n.alive and n.gpu_ids
            )
            problems.append(
                f"{where}: no alive Ray node there owns that GPU ({held or 'no GPU nodes alive'}); start one with "
                f"CUDA_VISIBLE_DEVICES including {device}, or choose other ranks ({_ranges(self.available())} exist)"
            )
        return problems


def _place_gpu(
    requests: Sequence[ComponentRequest], topology: Topology, given_d: int | None, notes: list[str]
) -> tuple[list[WorkerPlacement], list[str], int | None]:
    """GPU workers, the per-rank problems and the D used; cluster-wide problems raise at once."""
    if not requests:
        return [], [], given_d
    if topology.total_gpus == 0:
        raise PlacementError(
            [
                f"application {r.app_name!r} asks for {r.device_type} ranks {list(r.ranks)} but no alive Ray node "
                "has GPUs; start Ray with --num-gpus (or set device_type: cpu)"
                for r in requests
            ]
        )
    machines = topology.machines()
    d = _device_count(requests, [m for m in machines if m.has_gpus], given_d, notes)
    problems: list[str] = []
    resolver = _RankResolver(machines, d, inferred=given_d is None)
    workers = []
    for req in requests:
        for index, rank in enumerate(req.ranks):
            found = resolver.resolve(rank)
            if isinstance(found, list):
                problems.extend(f"application {req.app_name!r}: {p}" for p in found)
                continue
            machine, node, device = found
            workers.append(
                WorkerPlacement(
                    app_name=req.app_name,
                    worker_index=index,
                    node_id=node.node_id,
                    node_ip=node.ip,
                    machine_index=machine.index,
                    device_type=req.device_type,
                    rank=rank,
                    device=device,
                    node_gpu_index=node.gpu_ids.index(device),
                    mesh=_mesh_label(index, req.mesh),
                )
            )
    return workers, problems, d


def _cpu_candidates(topology: Topology) -> list[tuple[Machine, RayNode]]:
    """Alive nodes for CPU workers: GPU-less nodes first, then the head, then the other GPU nodes."""
    pairs = [(m, n) for m in topology.machines() for n in m.nodes if n.alive]
    return sorted(pairs, key=lambda pair: (bool(pair[1].gpu_ids), not pair[1].is_head))


def _place_cpu(
    requests: Sequence[ComponentRequest], topology: Topology
) -> tuple[list[WorkerPlacement], list[str], list[str]]:
    candidates = _cpu_candidates(topology)
    used: dict[str, int] = {}
    workers, problems = [], []
    for req in requests:
        count = req.world_size or req.ncpu_proc_per_node or 1
        per_node = req.ncpu_proc_per_node or count
        if per_node < 1:
            problems.append(f"application {req.app_name!r}: ncpu_proc_per_node must be >= 1, got {per_node}")
            continue
        needed = math.ceil(count / per_node)
        if needed > len(candidates):
            problems.append(
                f"application {req.app_name!r}: {count} CPU workers at ncpu_proc_per_node={per_node} need "
                f"{needed} Ray nodes but {len(candidates)} are alive; raise ncpu_proc_per_node or add nodes"
            )
            continue
        for index in range(count):
            machine, node = candidates[index // per_node]
            slot = used.get(node.node_id, 0)
            used[node.node_id] = slot + 1
            workers.append(
                WorkerPlacement(
                    app_name=req.app_name,
                    worker_index=index,
                    node_id=node.node_id,
                    node_ip=node.ip,
                    machine_index=machine.index,
                    device_type="cpu",
                    cpu_slot=slot,
                    mesh=_mesh_label(index, req.mesh),
                )
            )
    notes = [
        f"{_describe(node)} hosts {used[node.node_id]} CPU workers but has {node.num_cpus:g} CPUs"
        for _, node in candidates
        if used.get(node.node_id, 0) > node.num_cpus
    ]
    return workers, problems, notes


def _with_gpu_fractions(workers: Sequence[WorkerPlacement]) -> list[WorkerPlacement]:
    """Give the k workers that share one physical GPU a 1/k share each, so Ray's GPU count still adds up."""
    sharers: dict[tuple[str, int | None], int] = {}
    for worker in workers:
        key = (worker.node_id, worker.device)
        sharers[key] = sharers.get(key, 0) + 1
    return [
        replace(w, gpu_fraction=1.0 / sharers[(w.node_id, w.device)]) if sharers[(w.node_id, w.device)] > 1 else w
        for w in workers
    ]


def plan_placement(
    requests: Sequence[ComponentRequest],
    topology: Topology,
    device_count_per_physical_node: int | None,
    *,
    allow_shared_gpus: bool = False,
) -> PlacementPlan:
    """Place every worker of every request, or raise :class:`PlacementError` listing every problem found.

    Two applications on one physical GPU are an error unless ``allow_shared_gpus``: then they share it and
    each of its workers gets ``gpu_fraction`` 1/k of it (the seed's tinker example puts a vLLM sampler with
    ``gpu_memory_utilization: 0.5`` on rank 0 of the model). Pure: reads nothing but its arguments (pass
    :func:`device_count_from_env` for the environment's D).
    """
    problems: list[str] = []
    names = [r.app_name for r in requests]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"application name {name!r} is used more than once")
    gpu_requests = [r for r in requests if r.uses_gpus]
    cpu_requests = [r for r in requests if not r.uses_gpus]
    for req in gpu_requests:
        problems.extend(_validate_gpu_request(req))
    notes: list[str] = []
    for (a, b), ranks in _overlaps(gpu_requests).items():
        if allow_shared_gpus:
            notes.append(
                f"applications {a!r} and {b!r} share physical GPU rank(s) {_ranges(ranks)} (allow_shared_gpus)"
            )
        else:
            problems.append(
                f"applications {a!r} and {b!r} both claim physical GPU rank(s) {_ranges(ranks)}; each GPU belongs "
                "to one application: give them disjoint ranks, or plan with allow_shared_gpus if they are meant "
                "to share the memory (e.g. a vLLM sampler with gpu_memory_utilization < 1)"
            )
    if problems:
        raise PlacementError(problems)

    gpu_workers, gpu_problems, d = _place_gpu(gpu_requests, topology, device_count_per_physical_node, notes)
    cpu_workers, cpu_problems, cpu_notes = _place_cpu(cpu_requests, topology)
    problems = gpu_problems + cpu_problems
    if problems:
        raise PlacementError(problems)
    by_app = {name: i for i, name in enumerate(names)}
    workers = sorted(_with_gpu_fractions(gpu_workers) + cpu_workers, key=lambda w: (by_app[w.app_name], w.worker_index))
    return PlacementPlan(
        workers=tuple(workers),
        notes=tuple(notes + cpu_notes),
        device_count_per_physical_node=d,
        machines=topology.machines(),
    )
