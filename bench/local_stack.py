"""Start-up time and memory of the local stack (`deploy/local.yaml` with an embedded Ray).

Prints the seconds from launching `python -m twinkle.server --config deploy/local.yaml` to the first healthy
response of every application, and the resident memory of the whole process tree (launcher, Ray's own
processes, Serve controller/proxy, every replica and worker) while it idles.

    hatch run python bench/local_stack.py [--config deploy/local.yaml] [--port 8000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out


def process_tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        text = " ".join(a.decode(errors="replace") for a in args if a)
    except OSError:
        return "?"
    for marker in ("ray::", "raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "twinkle.server"):
        if marker in text:
            return text[text.index(marker):][:60]
    return text[:60]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(REPO / "deploy" / "local.yaml"))
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--settle", type=float, default=5.0, help="seconds to idle before measuring memory")
    args = p.parse_args()

    text = Path(args.config).read_text().replace("port: 8000", f"port: {args.port}")
    cfg = Path(tempfile.mkdtemp()) / "stack.yaml"
    cfg.write_text(text)
    prefixes = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.strip().startswith("route_prefix:")]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cfg.parent)
    try:
        first = None
        pending = set(prefixes)
        while pending and time.monotonic() - t0 < 300:
            for prefix in list(pending):
                try:
                    if httpx.get(f"http://127.0.0.1:{args.port}{prefix}/healthz", timeout=2).status_code == 200:
                        pending.discard(prefix)
                        first = first or time.monotonic() - t0
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        all_up = time.monotonic() - t0
        if pending:
            print(f"not healthy after 300 s: {sorted(pending)}")
            return 1
        time.sleep(args.settle)
        pids = process_tree(proc.pid)
        rows = sorted(((rss_mb(pid), name(pid)) for pid in pids), reverse=True)
        total = sum(r for r, _ in rows)
        print(f"first healthy response: {first:.1f} s; every application healthy: {all_up:.1f} s")
        print(f"resident memory: {total:.0f} MB in {len(pids)} processes")
        for mb, label in rows:
            if mb >= 1:
                print(f"  {mb:7.0f} MB  {label}")
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
