"""The server config as typed, strict msgspec structs.

Every struct forbids unknown keys, so a typo (``dp_szie``) is an error instead of a silently ignored
setting. Checks that involve one struct run in its ``__post_init__``, so a config built in Python is checked
exactly like one loaded from YAML; they raise :class:`ConfigError` with a path relative to the struct, which
the loader prefixes with the struct's own position in the file.

Normalization also happens here, so every consumer sees one spelling: ``device_type`` is lower-case
(``gpu`` means ``cuda``), ``ranks`` is always a list, ``use_megatron`` is folded into ``backend``, an empty
``args:`` becomes the defaults of the application's kind, and an omitted ``deployments:`` becomes one
default deployment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta, field
from msgspec.structs import force_setattr

from twinkle.common.config.errors import ConfigError
from twinkle.common.limits import RequestLimits

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]

ServerType = Literal["twinkle", "tinker"]
ImportPath = Literal["server", "model", "sampler", "processor"]
DeviceType = Literal["cuda", "cpu", "npu"]

#: Accepted spellings of ``device_type`` (compared lower-case) and what they mean.
DEVICE_TYPE_ALIASES: dict[str, DeviceType] = {"cuda": "cuda", "gpu": "cuda", "cpu": "cpu", "npu": "npu"}

#: The tinker SDK gives up on a ``retrieve_future`` poll after 45 s; a held poll must end well before.
TINKER_CLIENT_READ_TIMEOUT_S = 45.0


class _Strict(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every config struct: unknown keys are errors, values are immutable, keywords only."""


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(message, path=path)


def _normalize_device_type(value: str, path: str) -> DeviceType:
    normalized = DEVICE_TYPE_ALIASES.get(value.strip().lower())
    if normalized is None:
        raise _fail(path, f'must be one of cuda, cpu, npu (any case; "gpu" means cuda), got "{value}"')
    return normalized


# --------------------------------------------------------------------------------------------- Ray Serve


class HttpOptions(_Strict):
    """Where and how HTTP is served: Ray Serve's proxy settings (``serve.start(http_options=...)``, Serve's
    defaults otherwise), which the server application's own listener honours alike under ``ingress: gateway``."""

    host: NonEmptyStr = "127.0.0.1"
    port: Annotated[int, Meta(ge=1, le=65535)] = 8000
    root_path: str = ""
    request_timeout_s: PositiveFloat | None = None
    keep_alive_timeout_s: PositiveInt | None = None
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = None
    ssl_ca_certs: str | None = None

    def __post_init__(self) -> None:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            given = "ssl_keyfile" if self.ssl_keyfile is not None else "ssl_certfile"
            raise _fail(given, "TLS needs both ssl_keyfile and ssl_certfile")

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for Ray Serve's ``HTTPOptions`` (unset keys left to Serve)."""
        return plain_data(self)


class AutoscalingConfig(_Strict):
    """Ray Serve ``autoscaling_config``; a key left out keeps Serve's default."""

    min_replicas: NonNegativeInt | None = None
    initial_replicas: NonNegativeInt | None = None
    max_replicas: PositiveInt | None = None
    target_ongoing_requests: PositiveFloat | None = None
    metrics_interval_s: PositiveFloat | None = None
    look_back_period_s: PositiveFloat | None = None
    smoothing_factor: PositiveFloat | None = None
    upscale_smoothing_factor: PositiveFloat | None = None
    downscale_smoothing_factor: PositiveFloat | None = None
    upscaling_factor: PositiveFloat | None = None
    downscaling_factor: PositiveFloat | None = None
    upscale_delay_s: NonNegativeFloat | None = None
    downscale_delay_s: NonNegativeFloat | None = None
    downscale_to_zero_delay_s: NonNegativeFloat | None = None
    aggregation_function: Literal["mean", "max", "min"] | None = None

    def __post_init__(self) -> None:
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise _fail("min_replicas", f"is {low}, more than max_replicas {high}")
        initial = self.initial_replicas
        if initial is not None and high is not None and initial > high:
            raise _fail("initial_replicas", f"is {initial}, more than max_replicas {high}")
        if initial is not None and low is not None and initial < low:
            raise _fail("initial_replicas", f"is {initial}, less than min_replicas {low}")


class RuntimeEnv(_Strict):
    """The Ray ``runtime_env`` of a deployment's replicas. ``env_vars`` values must be strings (quote numbers)."""

    env_vars: dict[str, str] | None = None
    pip: list[str] | dict[str, Any] | str | None = None
    uv: list[str] | dict[str, Any] | str | None = None
    conda: dict[str, Any] | str | None = None
    working_dir: str | None = None
    py_modules: list[str] | None = None
    excludes: list[str] | None = None
    image_uri: str | None = None
    worker_process_setup_hook: str | None = None
    config: dict[str, Any] | None = None


class RayActorOptions(_Strict):
    """The ``ray_actor_options`` Ray Serve allows for a replica. ``memory`` is in bytes."""

    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: NonNegativeFloat | None = None
    resources: dict[str, NonNegativeFloat] | None = None
    accelerator_type: str | None = None
    runtime_env: RuntimeEnv | None = None
    label_selector: dict[str, str] | None = None


class Deployment(_Strict):
    """One Ray Serve deployment of an application: replica count, autoscaling and the replica's resources."""

    name: NonEmptyStr
    num_replicas: PositiveInt | Literal["auto"] | None = None
    max_ongoing_requests: PositiveInt | None = None
    max_queued_requests: Annotated[int, Meta(ge=-1)] | None = None
    autoscaling_config: AutoscalingConfig | None = None
    ray_actor_options: RayActorOptions | None = None
    user_config: dict[str, Any] | None = None
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None
    graceful_shutdown_wait_loop_s: PositiveFloat | None = None
    graceful_shutdown_timeout_s: NonNegativeFloat | None = None
    max_replicas_per_node: PositiveInt | None = None
    placement_group_bundles: list[dict[str, NonNegativeFloat]] | None = None
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    logging_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise _fail(
                "num_replicas",
                "a fixed num_replicas and autoscaling_config exclude each other; "
                'drop one, or write num_replicas: "auto"',
            )
        if self.placement_group_strategy is not None and self.placement_group_bundles is None:
            raise _fail("placement_group_strategy", "needs placement_group_bundles")

    def max_replicas(self) -> int | None:
        """The most replicas Serve may run (None: ``num_replicas: auto``, Serve decides)."""
        if self.num_replicas == "auto":
            return None
        if self.autoscaling_config is not None:
            return self.autoscaling_config.max_replicas or 1
        return self.num_replicas or 1

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for ``serve.deployment(...).options(...)``, without ``name``.

        Keys that were not set are left out, so Ray Serve applies its own defaults.
        """
        options = plain_data(self)
        options.pop("name", None)
        return options


# ------------------------------------------------------------------------------------- devices and meshes


class DeviceGroup(_Strict):
    """The devices one application's workers run on.

    ``ranks`` for ``cuda``/``npu`` are **physical** device ids (``DEVICE_COUNT_PER_PHYSICAL_NODE`` turns an
    id into machine and local device); an int ``N`` means the first N ids, ``[0 .. N-1]``.

    For ``cpu`` the seed writes an int (``ranks: 0``, "CPU 编号") whose meaning it never defines, and upstream
    reads it as a process count; neither fits the seed, where ``ranks: 0`` comes with 4 workers. So a CPU
    group's int is kept, untouched, in ``cpu_ranks_hint`` and ``ranks`` becomes the worker slots
    ``[0 .. W-1]``, W being the world size of the application's ``device_mesh``. An empty ``ranks`` on a
    standalone CPU group means "sized by the mesh" until the application fills it in.
    """

    name: NonEmptyStr
    ranks: list[NonNegativeInt] | NonNegativeInt
    device_type: str = "cuda"
    cpu_ranks_hint: NonNegativeInt | None = None

    def __post_init__(self) -> None:
        device_type = _normalize_device_type(self.device_type, "device_type")
        force_setattr(self, "device_type", device_type)
        if isinstance(self.ranks, int):
            self._expand_int_ranks(device_type, self.ranks)
        else:
            self._check_rank_list(device_type, self.ranks)
        if self.cpu_ranks_hint is not None and device_type != "cpu":
            raise _fail("cpu_ranks_hint", f"only applies to device_type cpu, not {device_type}")

    def _expand_int_ranks(self, device_type: str, count: int) -> None:
        if device_type == "cpu":
            force_setattr(self, "cpu_ranks_hint", count)
            force_setattr(self, "ranks", [])
            return
        if count < 1:
            raise _fail("ranks", f"a count of {device_type} devices must be at least 1, got {count}")
        force_setattr(self, "ranks", list(range(count)))

    @staticmethod
    def _check_rank_list(device_type: str, ranks: list[int]) -> None:
        if not ranks and device_type != "cpu":
            raise _fail("ranks", f"lists no {device_type} device; give physical ids such as [0, 1]")
        seen: set[int] = set()
        for index, rank in enumerate(ranks):
            if rank in seen:
                raise _fail(f"ranks[{index}]", f"rank {rank} is listed twice")
            seen.add(rank)

    @property
    def is_gpu(self) -> bool:
        """True for accelerator groups (``cuda``/``npu``), whose ranks are physical device ids."""
        return self.device_type != "cpu"


class DeviceMesh(_Strict):
    """How an application's workers split the model: data, tensor, pipeline, context and expert parallel sizes.

    ``world_size = dp_size * tp_size * pp_size * cp_size`` workers, one per rank of the device group.
    Experts are sharded over the ranks of one pipeline stage, so ``ep_size`` must divide
    ``dp_size * tp_size * cp_size`` (backends may require more, e.g. megatron-core's expert-tensor rules).
    ``device_type`` left out is taken from the application's ``device_group`` (``cuda`` without one).
    """

    device_type: str | None = None
    dp_size: PositiveInt = 1
    tp_size: PositiveInt = 1
    pp_size: PositiveInt = 1
    cp_size: PositiveInt = 1
    ep_size: PositiveInt = 1

    def __post_init__(self) -> None:
        if self.device_type is not None:
            force_setattr(self, "device_type", _normalize_device_type(self.device_type, "device_type"))
        stage_ranks = self.dp_size * self.tp_size * self.cp_size
        if stage_ranks % self.ep_size:
            raise _fail(
                "ep_size",
                f"{self.ep_size} does not divide dp_size * tp_size * cp_size = {stage_ranks} "
                "(experts are sharded over the ranks of one pipeline stage)",
            )

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size * self.pp_size * self.cp_size


def _mesh_formula(mesh: DeviceMesh) -> str:
    """``dp_size 2 * tp_size 2``: the sizes that make up the world size (size-1 axes left out)."""
    sizes = {"dp_size": mesh.dp_size, "tp_size": mesh.tp_size, "pp_size": mesh.pp_size, "cp_size": mesh.cp_size}
    shown = [f"{name} {value}" for name, value in sizes.items() if value != 1] or ["dp_size 1"]
    return " * ".join(shown)


# ------------------------------------------------------------------------------------ application args


class AdapterConfig(_Strict):
    """Limits on the LoRA adapters that users create on a model application."""

    per_token_adapter_limit: PositiveInt = 30
    """How many adapters one API key may hold on this model at the same time."""
    adapter_timeout: PositiveFloat = 1800.0
    """Seconds an adapter may stay idle (no request, no heartbeat) before it is unloaded."""


class _PlacedArgs(_Strict):
    """Placement logic shared by the applications that run workers on devices (model, sampler, processor).

    Each subclass declares ``nproc_per_node``, ``device_group`` and ``device_mesh`` itself, after its own
    fields, so that a dumped config reads model first, placement after.
    """

    if TYPE_CHECKING:  # declared by each subclass (see above); named here for type checkers only
        nproc_per_node: int
        device_group: DeviceGroup | None
        device_mesh: DeviceMesh | None

    def _cpu_worker_fallback(self) -> int:
        """How many CPU workers to run when a CPU group gives no list and there is no mesh to size it."""
        return self.nproc_per_node

    def _resolve_placement(self) -> None:
        """Make group and mesh agree: same device type, one mesh slot per rank, whole nodes per GPU group."""
        group, mesh = self.device_group, self.device_mesh
        if mesh is not None and mesh.device_type is None:
            mesh = msgspec.structs.replace(mesh, device_type=group.device_type if group else "cuda")
        if group is None:
            force_setattr(self, "device_mesh", mesh)
            return
        if mesh is None:
            workers = len(group.ranks) or self._cpu_worker_fallback()
            mesh = DeviceMesh(device_type=group.device_type, dp_size=workers)
        elif mesh.device_type != group.device_type:
            raise _fail(
                "device_mesh.device_type",
                f"is {mesh.device_type} but device_group.device_type is {group.device_type}; they must match",
            )
        if not group.is_gpu and not group.ranks:
            group = msgspec.structs.replace(group, ranks=list(range(mesh.world_size)))
        if len(group.ranks) != mesh.world_size:
            raise _fail(
                "device_mesh",
                f"the mesh has {mesh.world_size} workers ({_mesh_formula(mesh)}) but device_group "
                f"{group.name!r} has {len(group.ranks)} ranks {group.ranks}; "
                "the mesh needs exactly one rank per worker",
            )
        if group.is_gpu and len(group.ranks) % self.nproc_per_node:
            raise _fail(
                "nproc_per_node",
                f"{self.nproc_per_node} does not divide the {len(group.ranks)} ranks of device_group "
                f"{group.name!r}; each node must hold nproc_per_node of them",
            )
        force_setattr(self, "device_group", group)
        force_setattr(self, "device_mesh", mesh)

    @property
    def device_type(self) -> str | None:
        """The device type the workers run on, or None when neither group nor mesh says."""
        if self.device_group is not None:
            return self.device_group.device_type
        return self.device_mesh.device_type if self.device_mesh is not None else None


def _require_model_id(model_id: str | None) -> str:
    if not model_id:
        raise _fail("model_id", "is required to deploy this application (ms://…, hf://…, or a local path)")
    return model_id


class ApiKeySpec(_Strict):
    """An API key with a role: ``user`` owns its runs, sessions and checkpoints; ``admin`` also sees every
    tenant's usage and the services' internals (workers, queues, engine settings)."""

    key: NonEmptyStr
    role: Literal["user", "admin"] = "user"


class ServerArgs(_Strict, tag_field="import_path", tag="server"):
    """Arguments of the central server (gateway) application."""

    api_keys: list[NonEmptyStr | ApiKeySpec] = []
    """Keys accepted in ``X-API-Key`` besides those in the state store: a plain string, or ``{key, role}``
    with ``role: admin`` for an operator's key. Read back as plain strings; admin keys move to
    ``admin_keys``."""
    admin_keys: list[NonEmptyStr] = []
    """Admin keys (also accepted as API keys); ``TWINKLE_ADMIN_KEYS`` adds more at launch."""
    supported_models: list[NonEmptyStr] | None = None
    """Base models clients may ask for; None means every model application of this config."""
    session_timeout_s: PositiveFloat = 120.0
    """A session with no heartbeat for this long is closed (the tinker SDK beats every 10 s)."""
    long_poll_timeout_s: PositiveFloat = 25.0
    """How long a ``retrieve_future`` poll is held before ``try_again``; below the SDK's 45 s read timeout."""
    future_ttl_s: PositiveFloat = 86400.0
    """How long a finished request's result is kept for retrieval."""
    max_body_bytes: PositiveInt = 64 * 1024 * 1024
    """Largest request body accepted; a bigger one gets 413 with a message."""
    max_pending_per_key: PositiveInt = 256
    """Requests one API key may have queued or running at once; past it, 429 with ``Retry-After``."""
    max_polls_per_key: PositiveInt = 64
    """Long-polls one API key may hold open at once; past it, 429 (polls must not fill the server's slots)."""
    max_sessions_per_key: PositiveInt = 256
    """Open sessions one API key may hold; past it, 429 until some finish or time out."""
    max_checkpoints_per_key: PositiveInt = 10000
    """Checkpoints one API key may keep; a save past it is refused until some are deleted."""
    max_checkpoint_bytes_per_key: PositiveInt = 1 << 40
    """Bytes of checkpoints one API key may keep."""
    replica_wait_s: PositiveFloat = 45.0
    """How long a numbered training request whose model replica died waits for the restarted replica before
    failing (it is then sent again: the model service never applies a ``seq_id`` twice)."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """Bounds on every request (datums, tokens, samples, stop strings, metadata, ...), checked before any work
    and advertised to clients; see ``twinkle.common.limits.RequestLimits`` for each key and its default."""

    def __post_init__(self) -> None:
        if self.long_poll_timeout_s >= TINKER_CLIENT_READ_TIMEOUT_S:
            raise _fail(
                "long_poll_timeout_s",
                f"{self.long_poll_timeout_s:g} s reaches the tinker SDK's {TINKER_CLIENT_READ_TIMEOUT_S:g} s "
                "read timeout; keep it below (25 is a good value)",
            )
        seen: set[str] = set()
        for index, key in enumerate(self.api_keys):
            raw = key if isinstance(key, str) else key.key
            if raw in seen:
                raise _fail(f"api_keys[{index}]", "this key is listed twice")
            seen.add(raw)
        admins = [k.key for k in self.api_keys if not isinstance(k, str) and k.role == "admin"]
        force_setattr(self, "api_keys", [k if isinstance(k, str) else k.key for k in self.api_keys
                                         if isinstance(k, str) or k.role != "admin"])
        force_setattr(self, "admin_keys", list(dict.fromkeys([*self.admin_keys, *admins])))


class ModelArgs(_PlacedArgs, tag_field="import_path", tag="model"):
    """Arguments of a model (training) application: one base model, many LoRA adapters.

    ``backend`` is ``transformers`` or ``megatron``; the seed spells it ``use_megatron: true|false``, which
    is accepted, folded into ``backend`` and then cleared (giving both, inconsistently, is an error).
    ``model_id`` may be left out so that placement-only examples load; :meth:`require_model_id` (and
    :meth:`ServerConfig.check_deployable`) insist on it before anything is deployed.
    """

    model_id: NonEmptyStr | None = None
    backend: Literal["transformers", "megatron"] | None = None
    use_megatron: bool | None = None
    adapter_config: AdapterConfig = field(default_factory=AdapterConfig)
    max_loras: PositiveInt | None = None
    """LoRA slots loaded at once; None leaves it to the model service."""
    max_length: PositiveInt | None = None
    """Longest datum, in tokens, a forward/backward accepts (a longer one is a 400 naming it); None means the
    model's context length."""
    durable_runs: bool = True
    """Save each run's state after every optimizer step (under ``checkpoint_dir/.runs/``) so that runs survive
    a replica restart; false keeps runs in the replica's memory only."""
    nproc_per_node: PositiveInt = 1
    device_group: DeviceGroup | None = None
    device_mesh: DeviceMesh | None = None

    def __post_init__(self) -> None:
        force_setattr(self, "backend", self._resolved_backend())
        force_setattr(self, "use_megatron", None)
        self._resolve_placement()

    def _resolved_backend(self) -> Literal["transformers", "megatron"]:
        if self.use_megatron is None:
            return self.backend or "transformers"
        implied = "megatron" if self.use_megatron else "transformers"
        if self.backend is not None and self.backend != implied:
            raise _fail(
                "use_megatron",
                f"{str(self.use_megatron).lower()} contradicts backend: {self.backend}; give only one of them",
            )
        return implied

    def require_model_id(self) -> str:
        """The model id, or :class:`ConfigError` at ``model_id`` when it was left out."""
        return _require_model_id(self.model_id)


class SamplerArgs(_PlacedArgs, tag_field="import_path", tag="sampler"):
    """Arguments of a sampler (inference) application. ``vllm`` needs GPUs; ``torch`` runs anywhere."""

    model_id: NonEmptyStr | None = None
    sampler_type: Literal["torch", "vllm"] = "torch"
    engine_args: dict[str, Any] = {}
    """Passed to the engine as keyword arguments (for vllm: ``max_model_len``, ``gpu_memory_utilization``…)."""
    max_loras: PositiveInt = 8
    """Adapters kept loaded at once (least recently used is evicted)."""
    nproc_per_node: PositiveInt = 1
    device_group: DeviceGroup | None = None
    device_mesh: DeviceMesh | None = None

    def __post_init__(self) -> None:
        self._resolve_placement()
        if self.sampler_type == "vllm" and self.device_type == "cpu":
            raise _fail("sampler_type", "vllm cannot run on cpu; use sampler_type: torch for a cpu device_group")

    def require_model_id(self) -> str:
        """The model id, or :class:`ConfigError` at ``model_id`` when it was left out."""
        return _require_model_id(self.model_id)


class ProcessorArgs(_PlacedArgs, tag_field="import_path", tag="processor"):
    """Arguments of a processor (tokenization, templates, dataset encoding) application, usually on CPU.

    The number of workers is the mesh's world size; ``ncpu_proc_per_node`` is how many of them share a node.
    """

    model_id: NonEmptyStr | None = None
    ncpu_proc_per_node: PositiveInt | None = None
    nproc_per_node: PositiveInt = 1
    device_group: DeviceGroup | None = None
    device_mesh: DeviceMesh | None = None

    def _cpu_worker_fallback(self) -> int:
        return self.ncpu_proc_per_node or self.nproc_per_node

    def __post_init__(self) -> None:
        self._resolve_placement()


AppArgs = ServerArgs | ModelArgs | SamplerArgs | ProcessorArgs

#: Which args struct each ``import_path`` takes.
ARGS_BY_IMPORT_PATH: dict[str, type[AppArgs]] = {
    "server": ServerArgs,
    "model": ModelArgs,
    "sampler": SamplerArgs,
    "processor": ProcessorArgs,
}

#: The deployment name used when an application gives no ``deployments:`` (the seed's names).
DEFAULT_DEPLOYMENT_NAMES: dict[str, str] = {
    "model": "ModelManagement",
    "sampler": "SamplerManagement",
    "processor": "ProcessorManagement",
}
#: The server application's default deployment name depends on the protocol it speaks.
DEFAULT_SERVER_DEPLOYMENT_NAMES: dict[str, str] = {"twinkle": "TwinkleServer", "tinker": "TinkerCompatServer"}


def default_deployment_name(import_path: str, server_type: str = "twinkle") -> str:
    """The deployment name an application without ``deployments:`` gets (seed names: ``TwinkleServer``…)."""
    if import_path == "server":
        return DEFAULT_SERVER_DEPLOYMENT_NAMES[server_type]
    return DEFAULT_DEPLOYMENT_NAMES[import_path]


# ------------------------------------------------------------------------------------- applications


def _check_route_prefix(route_prefix: str) -> None:
    """Ray Serve's own rules, checked before anything starts."""
    if not route_prefix.startswith("/"):
        raise _fail("route_prefix", f'must start with "/", got "{route_prefix}" (write "/{route_prefix}")')
    if route_prefix != "/" and route_prefix.endswith("/"):
        raise _fail("route_prefix", f'must not end with "/", got "{route_prefix}"')
    if "{" in route_prefix or "}" in route_prefix or any(char.isspace() for char in route_prefix):
        raise _fail("route_prefix", f'must not contain wildcards or spaces, got "{route_prefix}"')


class Application(_Strict):
    """One Ray Serve application: a component (``import_path``), where it is mounted, its args and deployment."""

    name: NonEmptyStr
    route_prefix: str
    import_path: ImportPath
    args: AppArgs | None = None
    """Validated against the struct of ``import_path``; empty means that struct's defaults."""
    deployments: list[Deployment] = []
    """Exactly one deployment; omitted means one named by :func:`default_deployment_name`, Serve's defaults
    for every option (filled in by :class:`ServerConfig`, which knows the protocol)."""

    def __post_init__(self) -> None:
        _check_route_prefix(self.route_prefix)
        args_type = ARGS_BY_IMPORT_PATH[self.import_path]
        if self.args is None:
            force_setattr(self, "args", args_type())
        elif not isinstance(self.args, args_type):
            given = type(self.args).__name__
            raise _fail("args", f"import_path {self.import_path} takes {args_type.__name__}, got {given}")
        if len(self.deployments) > 1:
            raise _fail("deployments[1]", "an application has exactly one deployment")

    @property
    def deployment(self) -> Deployment:
        """The application's deployment (a default one when none is given, see :class:`ServerConfig`)."""
        if self.deployments:
            return self.deployments[0]
        return Deployment(name=default_deployment_name(self.import_path))


# ------------------------------------------------------------------------------------------- top level


class ServerConfig(_Strict):
    """A whole server deployment: protocol, HTTP proxy, where state lives, and the applications."""

    server_type: ServerType = "twinkle"
    ingress: Literal["serve", "gateway"] = "serve"
    """Who answers HTTP on ``http_options``. ``serve``: Ray Serve's proxy, which routes every application's
    ``route_prefix``. ``gateway`` (``server_type: tinker`` only): the server application's replica itself,
    placed on the launcher's machine, with no proxy hop in front of it; only the server application's
    routes are served over HTTP (Tinker clients need no other), and Serve's proxy is not started."""
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] | None = None
    """Where Serve runs its HTTP proxy; unset: ``EveryNode`` (Serve's default), ``Disabled`` under
    ``ingress: gateway`` (which refuses any other value)."""
    http_options: HttpOptions = field(default_factory=HttpOptions)
    ray_namespace: NonEmptyStr | None = None
    """Ray namespace of the deployment; None lets the launcher choose (CLI ``--namespace`` overrides)."""
    checkpoint_dir: NonEmptyStr | None = None
    """Root of the checkpoint store, on a filesystem every node sees; None lets the launcher choose."""
    state_db: NonEmptyStr | None = None
    """Where the gateway keeps sessions, runs and futures (an SQLite file path); None lets the launcher choose."""
    log_format: Literal["text", "json"] = "text"
    """Log lines of the launcher and every replica: text, or JSON objects, one per line (Ray Serve's JSON
    encoding: time, level, message, Serve's request id; an unexpected error adds its ``correlation_id``, the
    one in the client's error body, and the ``request_id`` of the request it failed)."""
    applications: list[Application] = []

    def __post_init__(self) -> None:
        problems = self._ingress_problems() + self._application_problems()
        if problems:
            raise ConfigError.collect(problems)
        force_setattr(self, "applications", [self._with_deployment(app) for app in self.applications])

    def _with_deployment(self, app: Application) -> Application:
        """``app`` with its default deployment filled in when it gave none."""
        if app.deployments:
            return app
        default = Deployment(name=default_deployment_name(app.import_path, self.server_type))
        return msgspec.structs.replace(app, deployments=[default])

    @property
    def serve_proxy_location(self) -> str:
        """Where Serve's proxy runs, ``proxy_location`` resolved (see there)."""
        if self.proxy_location is not None:
            return self.proxy_location
        return "Disabled" if self.ingress == "gateway" else "EveryNode"

    def _ingress_problems(self) -> list[ConfigError]:
        if self.ingress != "gateway":
            return []
        problems = []
        if self.server_type != "tinker":
            problems.append(_fail("ingress", f"gateway serves only the server application's routes, and a "
                                  f"{self.server_type} server's clients also call the model, sampler and processor "
                                  "applications' routes; use ingress: serve, or server_type: tinker"))
        if self.proxy_location not in (None, "Disabled"):
            problems.append(_fail("proxy_location", f"{self.proxy_location}: under ingress: gateway the server "
                                  "application answers on http_options and Serve's proxy is not started; leave "
                                  "proxy_location out (or Disabled), or use ingress: serve"))
        return problems

    def _application_problems(self) -> list[ConfigError]:
        problems: list[ConfigError] = []
        first_by_name: dict[str, int] = {}
        first_by_prefix: dict[str, int] = {}
        server_index: int | None = None
        for index, app in enumerate(self.applications):
            at = f"applications[{index}]"
            if app.name in first_by_name:
                problems.append(
                    _fail(f"{at}.name", f'"{app.name}" is already the name of applications[{first_by_name[app.name]}]')
                )
            first_by_name.setdefault(app.name, index)
            if app.route_prefix in first_by_prefix:
                other = first_by_prefix[app.route_prefix]
                problems.append(
                    _fail(f"{at}.route_prefix", f'"{app.route_prefix}" is already used by applications[{other}]')
                )
            first_by_prefix.setdefault(app.route_prefix, index)
            if app.import_path == "server":
                if server_index is not None:
                    message = f"a second server application (the first is applications[{server_index}])"
                    problems.append(_fail(f"{at}.import_path", message))
                server_index = index if server_index is None else server_index
            if app.import_path == "processor" and self.server_type == "tinker":
                problems.append(
                    _fail(
                        f"{at}.import_path",
                        "processor applications are served only with server_type twinkle; tinker clients "
                        "process data locally, so remove this application or use server_type: twinkle",
                    )
                )
        return problems

    def with_server_type(self, server_type: ServerType) -> ServerConfig:
        """This config under another protocol (CLI ``-t``), checked again (tinker rejects processors)."""
        if server_type not in ("twinkle", "tinker"):
            raise _fail("server_type", f'must be twinkle or tinker, got "{server_type}"')
        # The constructor, not structs.replace: replace runs __post_init__ only from msgspec 0.21 on.
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        return ServerConfig(**{**fields, "server_type": server_type})

    def applications_of(self, import_path: ImportPath) -> list[Application]:
        """The applications of one kind, in file order."""
        return [app for app in self.applications if app.import_path == import_path]

    def check_deployable(self) -> None:
        """What the schema lets pass for the sake of partial examples but a deployment needs.

        Exactly one server application, and a ``model_id`` on every model and sampler application.
        Raises :class:`ConfigError` listing every problem.
        """
        problems: list[ConfigError] = []
        if not self.applications_of("server"):
            problems.append(_fail("applications", "no application has import_path: server; the gateway needs one"))
        for index, app in enumerate(self.applications):
            if isinstance(app.args, (ModelArgs, SamplerArgs)):
                try:
                    app.args.require_model_id()
                except ConfigError as error:
                    problems.append(error.relocated(prefix=f"applications[{index}].args"))
        if problems:
            raise ConfigError.collect(problems)


    def check_supported(self) -> None:
        """What this release can honour, refused rather than reinterpreted. Raises :class:`ConfigError`
        listing every setting it would otherwise run differently from what the YAML says:

        - parallelism a backend does not implement (``device_mesh.tp_size`` … ``ep_size`` > 1): the megatron
          backend (``use_megatron: true``) runs tensor, pipeline and data parallelism, not context or expert
          parallelism; the transformers backend and the samplers run data parallel only;
        - one replica of the server application (its store is one SQLite writer);
        - several replicas of a model or sampler application only where each replica's worker runs in the
          replica itself (CPU, one worker): a replica of an application with GPU or multi-worker groups
          would need devices of its own, which this release does not plan; a model application's runs move
          between replicas through their durable state, so it also needs ``durable_runs``.
        """
        problems: list[ConfigError] = []
        for index, app in enumerate(self.applications):
            at = f"applications[{index}]"
            args = app.args
            mesh = getattr(args, "device_mesh", None)
            if mesh is not None and isinstance(args, (ModelArgs, SamplerArgs)):
                megatron = isinstance(args, ModelArgs) and args.backend == "megatron"
                serving = ("the megatron backend" if megatron else "the transformers backend"
                           if isinstance(args, ModelArgs) else "the samplers")
                implemented = ("tp_size", "pp_size") if megatron else ()
                for axis, what in (("tp_size", "tensor"), ("pp_size", "pipeline"), ("cp_size", "context"),
                                   ("ep_size", "expert")):
                    size = getattr(mesh, axis)
                    if size > 1 and axis not in implemented:
                        runs = "tp_size x pp_size model-parallel groups, dp_size of them" if megatron else \
                            "dp_size data-parallel workers"
                        problems.append(_fail(f"{at}.args.device_mesh.{axis}", f"{size} asks for {what} "
                                              f"parallelism, which {serving} in this release does not implement "
                                              f"(it runs {runs}); set it to 1"))
            if app.import_path in ("server", "model", "sampler") and app.deployment is not None:
                problems.extend(_replicas_supported(app.deployment, f"{at}.deployments[0]", app.import_path, args,
                                                    f"{at}.args"))
        if problems:
            raise ConfigError.collect(problems)


def _replicas_supported(deployment: Deployment, at: str, kind: str, args: Any, args_at: str) -> list[ConfigError]:
    """Problems with running ``deployment.max_replicas()`` replicas of a ``kind`` application."""
    most = deployment.max_replicas()
    if most == 1:
        return []
    key = f"{at}.autoscaling_config.max_replicas" if deployment.autoscaling_config is not None else f"{at}.num_replicas"
    asked = deployment.num_replicas if most is None or deployment.autoscaling_config is None else most
    if most is None:
        return [_fail(key, '"auto": give num_replicas or autoscaling_config.max_replicas, so that the replicas '
                      "this application may run are known")]
    if kind == "server":
        return [_fail(key, f"{asked!r}: the server application runs one replica (its state store has one writer)")]
    mesh = getattr(args, "device_mesh", None)
    if args.device_type not in (None, "cpu") or (mesh is not None and mesh.world_size > 1):
        return [_fail(key, f"{asked!r}: several replicas of a {kind} application are supported where each "
                      "replica's worker runs in the replica (device_type CPU, one worker); GPU or multi-worker "
                      "groups would need devices of their own per replica, which this release does not plan")]
    if kind == "model" and not args.durable_runs:
        return [_fail(f"{args_at}.durable_runs", f"false, with {asked!r} replicas: runs move between a model "
                      "application's replicas through their durable state; keep durable_runs: true")]
    return []


def plain_data(value: Any) -> Any:
    """Plain dicts/lists of a config value, leaving out struct fields that are None ("not set").

    Only struct fields are dropped when None; a None inside a free-form mapping (``engine_args``,
    ``user_config``) is kept, since there it is a value the user wrote. Tag fields are not emitted.
    """
    if isinstance(value, msgspec.Struct):
        fields = msgspec.structs.fields(value)
        return {
            spec.encode_name: plain_data(getattr(value, spec.name))
            for spec in fields
            if getattr(value, spec.name) is not None
        }
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    return value
