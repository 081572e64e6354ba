"""``launch_server``: from one YAML file to running Ray Serve applications.

The sequence, and why in this order:

1. load and validate the config (a mistake is reported with its YAML line before anything starts);
2. check the auth settings against the bind address (no open server on a public interface);
3. join the Ray cluster, or start an embedded one;
4. read the live topology and compute the placement plan (a rank no node has, or two applications on one
   GPU, fails here, before any actor exists);
5. start Serve with ``http_options`` / ``proxy_location`` and deploy every application at once
   (``serve.run_many``): replicas start in parallel, which is most of the start-up time; the log shows each
   application's status and replica counts as they change;
6. block until SIGINT/SIGTERM, then shut Serve (and an embedded Ray) down.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from twinkle.common.component import ComponentSpec, Listen, PeerApp
from twinkle.common.config import ServerConfig, load_config
from twinkle.common.models import served_model_name
from twinkle.common.placement import PlacementPlan, device_count_from_env, plan_for_config
from twinkle.common.workers import WorkerSpec, load_object

log = logging.getLogger("twinkle.server")

DEFAULT_NAMESPACE = "twinkle_cluster"

# import_path -> (the builder of its Serve application, its default deployment name)
_COMPONENTS = {
    "server": ("twinkle.server.deployment:build_application", None),
    "model": ("twinkle.model.deployment:build_application", "ModelManagement"),
    "sampler": ("twinkle.sampler.deployment:build_application", "SamplerManagement"),
    "processor": ("twinkle.processor.deployment:build_application", "ProcessorManagement"),
}
_SERVER_DEPLOYMENT = {"twinkle": "TwinkleServer", "tinker": "TinkerCompatServer"}


class LaunchError(RuntimeError):
    """The server cannot start as configured (e.g. its port is taken); the message says what to change."""


def _check_port_free(host: str, port: int) -> None:
    """An embedded Ray would start, then Serve's proxy (under ``ingress: gateway``, the server application)
    would fail to bind with a traceback; say it first."""
    from .listener import bind_socket

    try:
        bind_socket(host, port).close()
    except OSError as e:
        raise LaunchError(f"http_options: {host}:{port} is not available ({e.strerror}); is another server "
                          "running? Stop it or set http_options.port to a free port") from None


class LaunchedServer:
    """What ``launch_server(wait=False)`` returns: enough to find and stop what it started."""

    def __init__(self, config: ServerConfig, plan: PlacementPlan, embedded: bool, started_s: float) -> None:
        self.config = config
        self.plan = plan
        self.embedded = embedded
        self.started_s = started_s

    @property
    def base_url(self) -> str:
        host = self.config.http_options.host
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        scheme = "https" if self.config.http_options.ssl_certfile else "http"
        return f"{scheme}://{host}:{self.config.http_options.port}"

    def shutdown(self) -> None:
        shutdown(embedded=self.embedded)


def launch_server(
    config_path: str | os.PathLike | None = None,
    *,
    config: ServerConfig | None = None,
    server_type: str | None = None,
    namespace: str | None = None,
    wait: bool = True,
    log_level: str = "INFO",
    address: str | None = None,
) -> LaunchedServer:
    """Deploy the server described by the YAML at ``config_path`` (or ``config``).

    With ``wait=True`` (the default) this blocks until SIGINT/SIGTERM and then shuts everything down.
    """
    from . import _ray_runtime

    _ray_runtime.use_token_auth_if_available()  # before anything imports Ray: it reads the mode once
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.monotonic()
    if config is None:
        if config_path is None:
            raise ValueError("launch_server needs config_path or config")
        config = load_config(config_path)
    if config.log_format == "json":
        from twinkle.common.http import JsonLogFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    if server_type:
        config = config.with_server_type(server_type)
    config.check_deployable()
    config.check_supported()
    _check_auth(config)
    settings = resolve_storage(config)

    if address is None and not _ray_runtime._existing_cluster_address():
        _check_port_free(config.http_options.host, config.http_options.port)
    if not wait and address is None and not _ray_runtime._existing_cluster_address():
        # An embedded Ray dies with this process; --no-wait needs one that outlives it.
        address = _ray_runtime.start_detached_head(log_level)
    conn = _ray_runtime.connect(namespace or config.ray_namespace or DEFAULT_NAMESPACE, address=address,
                                log_level=log_level)
    # After ray.init, which installs a handler that aborts the process on SIGTERM.
    deployed = threading.Event()
    stop = _install_signal_handlers(deployed) if wait else None
    try:
        plan = _plan(config)
        log.info("placement plan:\n%s", plan.format_table())
        _deploy(config, plan, settings)
    except BaseException:
        shutdown(embedded=conn.embedded)
        raise
    deployed.set()
    server = LaunchedServer(config, plan, conn.embedded, time.monotonic() - t0)
    log.info("Twinkle (%s) is up at %s after %.1f s (%s)", config.server_type, server.base_url,
             server.started_s, conn.describe())
    for app in config.applications:
        if config.ingress == "gateway" and app.import_path != "server":
            log.info("  %-10s %-40s (through the server application)", app.import_path, app.name)
        else:
            log.info("  %-10s %-40s %s%s", app.import_path, app.name, server.base_url, app.route_prefix)
    if stop is not None:
        lost = _watch_applications(stop, [app.name for app in config.applications])
        if lost is None:
            log.info("shutting down")
            server.shutdown()
            return server
        reason = f"the deployment was lost ({lost}); exiting so that a supervisor restarts it"
        # Said before shutting down: Ray may end this process itself while it tears down a cluster whose
        # control store is gone, and the reason must be in the log either way.
        log.error(reason)
        _shutdown_lost(server)
        raise LaunchError(reason)
    return server


# How long the launcher waits for Ray to shut down after the deployment was lost.
LOST_SHUTDOWN_S = 30.0


def _shutdown_lost(server: LaunchedServer) -> None:
    """Shut down what is left of a lost deployment, for at most ``LOST_SHUTDOWN_S``: a Ray whose control
    store is gone can hang in its shutdown, and then this process ends without it (exit status 1)."""
    done = threading.Thread(target=server.shutdown, name="twinkle-shutdown", daemon=True)
    done.start()
    done.join(LOST_SHUTDOWN_S)
    if done.is_alive():
        log.error("Ray did not shut down within %g s; exiting without it", LOST_SHUTDOWN_S)
        logging.shutdown()
        os._exit(1)  # Ray's exit hook would wait for the same shutdown


def _watch_applications(stop: threading.Event, names: list[str]) -> str | None:
    """Wait for a stop signal (None) while checking that the Serve applications are there: when they stay
    lost (an application gone or failed, Serve or Ray unreachable) for ``TWINKLE_SUPERVISE_GRACE_S``
    (default 30 s), return what is wrong. Replica restarts are Serve's own business and never count."""
    interval = float(os.environ.get("TWINKLE_SUPERVISE_INTERVAL_S", "5"))
    grace = float(os.environ.get("TWINKLE_SUPERVISE_GRACE_S", "30"))
    lost_since: float | None = None
    while not stop.wait(interval):
        problem = _applications_problem(names, timeout_s=max(interval, 5.0))
        if problem is None:
            if lost_since is not None:
                log.info("the deployment is back")
            lost_since = None
            continue
        lost_since = lost_since or time.monotonic()
        log.warning("deployment check: %s", problem)
        if time.monotonic() - lost_since >= grace:
            return problem
    return None


def _applications_problem(names: list[str], timeout_s: float) -> str | None:
    """What is wrong with the deployed applications, or None. Asked on a daemon thread: a call into a dead
    cluster may hang, and neither the watch nor the process's exit may wait for it."""
    from ray import serve

    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["apps"] = serve.status().applications
        except Exception as e:  # noqa: BLE001 - any failure to ask means the deployment cannot be seen
            answer["error"] = e

    asker = threading.Thread(target=ask, name="twinkle-watch", daemon=True)
    asker.start()
    asker.join(timeout_s)
    if "error" in answer:
        return f"cannot reach Ray Serve ({type(answer['error']).__name__})"
    if "apps" not in answer:
        return f"Ray Serve did not answer within {timeout_s:g} s"
    apps = answer["apps"]
    missing = [n for n in names if n not in apps]
    failed = [n for n in names if n in apps and getattr(apps[n].status, "value", apps[n].status) == "DEPLOY_FAILED"]
    if missing:
        return f"application(s) {', '.join(missing)} no longer deployed"
    if failed:
        return f"application(s) {', '.join(failed)} failed to deploy"
    return None


def resolve_storage(config: ServerConfig) -> dict[str, str]:
    """Absolute checkpoint dir and state DB, resolved once here so every process agrees (a relative
    default resolved per process is how upstream lost checkpoints)."""
    root = config.checkpoint_dir or os.environ.get("TWINKLE_CHECKPOINT_DIR") or ".twinkle/checkpoints"
    checkpoint_dir = str(Path(root).expanduser().resolve())
    state_db = config.state_db or os.environ.get("TWINKLE_STATE_DB") or str(Path(checkpoint_dir).parent / "state.sqlite")
    state_db = str(Path(state_db).expanduser().resolve())
    os.makedirs(checkpoint_dir, exist_ok=True)
    os.makedirs(os.path.dirname(state_db), exist_ok=True)
    return {"checkpoint_dir": checkpoint_dir, "state_db": state_db}


def _check_auth(config: ServerConfig) -> None:
    from .auth import ADMIN_KEYS_ENV, check_auth_settings, keys_from_env

    args = _server_args(config)
    keys = [*(args.get("api_keys") or []), *(args.get("admin_keys") or []), *keys_from_env(ADMIN_KEYS_ENV)]
    check_auth_settings(config.http_options.host, keys)


def _server_args(config: ServerConfig) -> dict[str, Any]:
    for app in config.applications:
        if app.import_path == "server":
            return _plain(app.args)
    return {}


def _plain(args: Any) -> dict[str, Any]:
    from twinkle.common.config.schema import plain_data

    return plain_data(args) if args is not None else {}


def _plan(config: ServerConfig) -> PlacementPlan:
    from twinkle.common.topology import read_ray_topology

    return plan_config(config, read_ray_topology())


def plan_config(config: ServerConfig, topology, *, allow_shared_gpus: bool | None = None) -> PlacementPlan:
    """Place every worker. GPUs are exclusive unless sharing is asked for: explicitly, or implicitly by a
    vLLM sampler that takes only part of its GPU (``engine_args.gpu_memory_utilization`` < 1), as the
    seed's Tinker example does with a model and a sampler on GPU 0."""
    if allow_shared_gpus is None:
        allow_shared_gpus = _sampler_takes_part_of_gpu(config)
    return plan_for_config(config, topology, device_count_from_env(), allow_shared_gpus=allow_shared_gpus)


def _sampler_takes_part_of_gpu(config: ServerConfig) -> bool:
    for app in config.applications:
        if app.import_path == "sampler":
            util = (_plain(app.args).get("engine_args") or {}).get("gpu_memory_utilization")
            if isinstance(util, (int, float)) and util < 1.0:
                return True
    return False


def worker_specs(plan: PlacementPlan, app_name: str) -> list[WorkerSpec]:
    if app_name not in plan.apps:
        return []  # the central server has no workers of its own
    placements = plan.by_app(app_name)
    specs = []
    for p in placements:
        gpu = p.is_gpu
        specs.append(
            WorkerSpec(
                app=app_name,
                rank=p.worker_index,
                world_size=len(placements),
                node_id=p.node_id,
                node_ip=p.node_ip,
                cuda_visible_devices=p.visible_devices if gpu else None,
                num_gpus=p.gpu_fraction if gpu else 0.0,
                num_cpus=0.0,
                threads=None if gpu else max(1, (os.cpu_count() or 1) // max(1, len(placements))),
            )
        )
    return specs


def component_specs(config: ServerConfig, plan: PlacementPlan, settings: dict[str, str]) -> list[ComponentSpec]:
    peers = []
    for app in config.applications:
        if app.import_path == "server":
            continue
        args = _plain(app.args)
        model_id = args.get("model_id")
        deployment = app.deployments[0].name if app.deployments else _COMPONENTS[app.import_path][1]
        peers.append(PeerApp(app_name=app.name, deployment_name=deployment, import_path=app.import_path,
                             route_prefix=app.route_prefix, model_name=served_model_name(model_id) if model_id else None,
                             model_id=model_id))
    central = _central_app(config)
    specs = []
    for app in config.applications:
        args = _plain(app.args)
        if app.import_path == "server":
            args["api_keys"], args["admin_keys"] = _launcher_keys(args)
        specs.append(
            ComponentSpec(
                app_name=app.name,
                route_prefix=app.route_prefix,
                import_path=app.import_path,
                server_type=config.server_type,
                args=args,
                workers=worker_specs(plan, app.name),
                checkpoint_dir=settings["checkpoint_dir"],
                state_db=settings["state_db"],
                peers=peers if app.import_path == "server" else [],
                http_host=config.http_options.host,
                central=central if app.import_path != "server" else None,
                max_replicas=app.deployment.max_replicas() or 1,
                listen=_gateway_listen(config) if app.import_path == "server" else None,
            )
        )
    return specs


def _gateway_listen(config: ServerConfig) -> Listen | None:
    """Where the central replica answers HTTP under ``ingress: gateway``: the YAML's ``http_options``, on
    this machine."""
    if config.ingress != "gateway":
        return None
    import ray

    # the address this machine's raylet registered, which names its ``node:<ip>`` resource (the driver's own
    # guess of its address may differ, e.g. on a cluster started with --node-ip-address)
    node_id = ray.get_runtime_context().get_node_id()
    node_ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
    return Listen(http_options=config.http_options, node_ip=node_ip)


def _launcher_keys(server_args: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The server's keys and admin keys: the YAML's and those in the launcher's ``TWINKLE_API_KEYS`` and
    ``TWINKLE_ADMIN_KEYS``. They travel in the central app's spec, because its replica may run on a cluster
    started without the launcher's environment (``ray start``), where reading the variables there would find
    nothing and run open."""
    from .auth import ADMIN_KEYS_ENV, keys_from_env

    keys = list(dict.fromkeys([*(server_args.get("api_keys") or []), *keys_from_env()]))
    admins = list(dict.fromkeys([*(server_args.get("admin_keys") or []), *keys_from_env(ADMIN_KEYS_ENV)]))
    return keys, admins


def _central_app(config: ServerConfig) -> PeerApp | None:
    """The server application as the components see it: they reach it through a Serve handle."""
    for app in config.applications:
        if app.import_path == "server":
            name = app.deployments[0].name if app.deployments else _SERVER_DEPLOYMENT[config.server_type]
            return PeerApp(app_name=app.name, deployment_name=name, import_path="server",
                           route_prefix=app.route_prefix)
    return None


def _deploy(config: ServerConfig, plan: PlacementPlan, settings: dict[str, str]) -> None:
    from ray import serve

    from .deployment import central_mount

    serve.start(http_options=config.http_options.serve_options(), proxy_location=config.serve_proxy_location)
    targets = []
    for app, spec in zip(config.applications, component_specs(config, plan, settings)):
        builder_path, default_name = _COMPONENTS[app.import_path]
        default_name = default_name or _SERVER_DEPLOYMENT[config.server_type]
        deployment = app.deployments[0] if app.deployments else None
        target = load_object(builder_path)(spec, deployment, default_name)
        route_prefix = app.route_prefix
        if app.import_path == "server":
            route_prefix = central_mount(app.route_prefix, config.server_type)[0]
        logging_config = {"encoding": "JSON"} if config.log_format == "json" else None
        targets.append(serve.RunTarget(target=target, name=app.name, route_prefix=route_prefix,
                                       logging_config=logging_config))
    done = threading.Event()
    reporter = threading.Thread(target=_report_start_up, args=(done, [t.name for t in targets]),
                                name="twinkle-start-up", daemon=True)
    reporter.start()
    try:
        serve.run_many(targets, wait_for_applications_running=True)
    finally:
        done.set()


def _report_start_up(done: threading.Event, names: list[str], every_s: float = 2.0, repeat_s: float = 15.0) -> None:
    """Log the applications' start-up while ``serve.run_many`` waits for them: a line whenever an application's
    status or replica counts change, and at least every ``repeat_s`` with the time spent."""
    from ray import serve

    t0 = time.monotonic()
    last, last_at = "", t0
    while not done.wait(every_s):
        try:
            line = start_up_summary(serve.status().applications, names)
        except Exception:  # noqa: BLE001 - progress is best effort; run_many reports real failures
            continue
        now = time.monotonic()
        if line != last or now - last_at >= repeat_s:
            log.info("starting (%.0f s): %s", now - t0, line)
            last, last_at = line, now


def start_up_summary(apps: dict[str, Any], names: list[str]) -> str:
    """One line on the applications' progress: ``name STATUS running/target [other replica states]`` each."""
    parts = []
    for name in names:
        app = apps.get(name)
        if app is None:
            parts.append(f"{name} waiting")
            continue
        states: dict[str, int] = {}
        for deployment in app.deployments.values():
            for state, count in deployment.replica_states.items():
                key = getattr(state, "value", str(state)).lower()
                states[key] = states.get(key, 0) + count
        running = states.pop("running", 0)
        detail = ", ".join(f"{n} {s}" for s, n in sorted(states.items()) if n)
        status = getattr(app.status, "value", str(app.status))
        parts.append(f"{name} {status} {running}/{running + sum(states.values())} running"
                     + (f" ({detail})" if detail else ""))
    return "; ".join(parts)


def shutdown(*, embedded: bool) -> None:
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    t0 = time.monotonic()
    try:
        serve.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort on the way out
        log.warning("serve.shutdown failed: %s", e)
    if embedded:
        ray.shutdown()
    log.info("stopped in %.1f s", time.monotonic() - t0)


class _Interrupted(KeyboardInterrupt):
    """A stop signal that arrived while the server was still being deployed."""


def _install_signal_handlers(deployed: threading.Event) -> threading.Event:
    """SIGINT/SIGTERM set the returned event once the server is up, and abort the deployment (which then
    cleans up) while it is still starting."""
    stop = threading.Event()

    def _handler(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        first = not stop.is_set()
        stop.set()
        if first and not deployed.is_set():
            raise _Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)
    return stop
