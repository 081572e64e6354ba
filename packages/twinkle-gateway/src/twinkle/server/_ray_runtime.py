"""Joining a Ray cluster, or starting an embedded one when there is none.

Rule: ``RAY_ADDRESS`` (or ``--address``) names a cluster -> join it. Otherwise, if this machine runs a Ray
cluster started with ``ray start`` -> join it. Otherwise start an embedded single-node Ray inside this
process; it lives as long as the launcher does.

Ray 2.60's ``ray start --head`` turns on token authentication where a token exists (and a first local
``ray.init()`` creates ``~/.ray/auth_token``), and a driver joins only in token mode. When a token is at hand
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and the user set no ``RAY_AUTH_MODE``,
the launcher runs in token mode, which also works with clusters that have auth off. Ray reads the mode once,
when it is first imported, so ``use_token_auth_if_available`` runs before anything imports Ray.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from twinkle.common.workers import FORWARDED_ENV

log = logging.getLogger("twinkle.server")


class RayConnection:
    def __init__(self, *, embedded: bool, address: str | None) -> None:
        self.embedded = embedded
        self.address = address

    def describe(self) -> str:
        return "embedded local Ray" if self.embedded else f"Ray cluster at {self.address or 'auto'}"


def _existing_cluster_address() -> str | None:
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address()
    except Exception:  # noqa: BLE001 - private API; absence just means "no local cluster"
        return None


def use_token_auth_if_available() -> None:
    """Send Ray the cluster's token when one is at hand (``RAY_AUTH_MODE=token``), as ``ray start`` does
    for the cluster itself; a mode the user set is kept. Call before the process first imports Ray."""
    if os.environ.get("RAY_AUTH_MODE"):
        return  # the user's choice
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _join_error(target: str, error: Exception):
    from .launcher import LaunchError

    return LaunchError(
        f"cannot join the Ray cluster at {target} ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
        "If it uses token authentication (the default of `ray start` since Ray 2.60), make its token available "
        "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) and set RAY_AUTH_MODE=token; or pass "
        "--address for another cluster")


def _job_runtime_env() -> dict:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": env} if env else {}


def connect(namespace: str, *, address: str | None = None, log_level: str = "INFO") -> RayConnection:
    """Join or start Ray (see the module docstring). ``use_token_auth_if_available`` must have run before
    this process first imported Ray (``launch_server`` and the CLI call it first thing)."""
    import ray

    if ray.is_initialized():
        return RayConnection(embedded=False, address=None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    common = dict(namespace=namespace, runtime_env=_job_runtime_env(), logging_level=log_level, log_to_driver=True)
    target = address or _existing_cluster_address()
    if target:
        try:
            ray.init(address=target, **common)
            log.info("joined the Ray cluster at %s", target)
            return RayConnection(embedded=False, address=target)
        except (ConnectionError, RuntimeError, ValueError) as e:
            if address or os.environ.get("RAY_ADDRESS"):
                raise _join_error(target, e) from None
            log.info("no live Ray cluster at %s (%s); starting an embedded one", target, e)
    # A prestarted idle worker costs ~80 MB and every Twinkle actor starts its own process anyway.
    os.environ.setdefault("RAY_enable_worker_prestart", "0")
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Serve's controller runs its loop every 0.1 s by default: ~40 ms of CPU per tiny-model training step on
    # 2 cores (bench/tinker_bench.py --deploy); every 0.5 s it costs ~6 ms, and it notices a replica change at
    # most 0.4 s later.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.5")
    # Every Serve replica and handle router wakes up to hand its cached metrics to Ray's metrics API every
    # 0.1 s by default, while Ray exports them every 10 s: once a second is plenty, and the wake-ups saved are
    # CPU left to the training step.
    os.environ.setdefault("RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "1000")
    try:
        ray.init(include_dashboard=False, num_cpus=os.cpu_count() or 1, **common)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise _join_error(target or "this machine", e) from None
    log.info("started an embedded local Ray (%s CPUs)", os.cpu_count())
    return RayConnection(embedded=True, address=None)


def start_detached_head(log_level: str = "INFO") -> str:
    """For ``--no-wait`` without a cluster: a ``ray start --head`` that outlives this process."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--include-dashboard=false",
           "--disable-usage-stats"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return "auto"
