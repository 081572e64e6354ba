"""Helpers for tests that run real Ray clusters and deployed servers on loopback."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # ~/.ray/auth_token is shared by every Ray on the machine; loopback test clusters need none.
        RAY_AUTH_MODE="disabled",
    )
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return r
            last = RuntimeError(f"{url}: {r.status_code} {r.text[:200]}")
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s}s: {last}")


def wait_launched(log_path, timeout_s: float, proc: subprocess.Popen) -> None:
    """Wait until the launcher logged that every application is running (``... is up at ...``); under
    ``ingress: gateway`` only the server application answers HTTP, so no route can tell."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was up")
        if " is up at " in Path(log_path).read_text(errors="replace"):
            return
        time.sleep(0.3)
    raise TimeoutError(f"the server was not up within {timeout_s}s")


def ray_processes(marker: str) -> list[str]:
    """``"<pid> <command line>"`` of live processes whose command line mentions ``marker`` (a per-test temp
    dir or session). Read from /proc: ``ps`` cuts lines to $COLUMNS, which test runners set."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{entry} {cmdline}")
    return found


class RayHead:
    """``ray start --head`` on loopback with fake GPUs, in its own temp dir; stopped by ``stop()``.

    As on a user's machine that has a Ray token, the cluster runs with Ray's token authentication: ``ray
    start`` turns it on by itself when a token exists (here a fresh one in the temp dir, named by
    ``RAY_AUTH_TOKEN_PATH``, so that ~/.ray is never touched) and ``RAY_AUTH_MODE`` is unset.
    ``client_env()`` is the environment of a process that joins it the same way a user's would."""

    def __init__(self, num_gpus: int = 4, num_cpus: int = 4) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="twr-", dir="/tmp")
        self.port = free_port()
        token = os.path.join(self.temp_dir, "auth_token")
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        os.chmod(token, 0o600)
        self.env = self.client_env()
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
            f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-gpus={num_gpus}",
            f"--num-cpus={num_cpus}", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
        ]
        subprocess.run(cmd, check=True, env=self.env, capture_output=True, timeout=120)
        self.address = f"127.0.0.1:{self.port}"

    def client_env(self, **extra: str) -> dict[str, str]:
        env = base_env(**extra)
        env.pop("RAY_AUTH_MODE", None)  # Ray's default: token auth where a token is found
        env["RAY_AUTH_TOKEN_PATH"] = os.path.join(self.temp_dir, "auth_token")
        return env

    def stop(self) -> None:
        """Stop this cluster's processes only (``ray stop`` would stop every Ray on the machine)."""
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            pids = [int(line.split()[0]) for line in ray_processes(self.temp_dir)]
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while ray_processes(self.temp_dir) and time.monotonic() < deadline:
                time.sleep(0.3)


def terminate(proc: subprocess.Popen, timeout_s: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
