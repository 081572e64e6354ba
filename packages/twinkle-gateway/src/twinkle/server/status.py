"""``twinkle-server status``: what runs on the live cluster — each Serve application's state and replicas, and
what its service says of itself (queued and served requests, failures, resident adapters, workers alive).

It joins the cluster as a driver (``--address``, default ``auto``: ``RAY_ADDRESS`` or a local ``ray start``
cluster, with Ray's token auth when the cluster has it), reads ``serve.status()`` and calls each application's
``health()`` and ``info()`` through a Serve handle, each bounded by a timeout so that a stuck replica shows up
as such instead of hanging the command.
"""

from __future__ import annotations

from typing import Any

import msgspec

_CALL_TIMEOUT_S = 10.0


def cluster_status(address: str = "auto") -> dict[str, Any]:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        status = serve.status()
        apps = []
        for name, app in sorted(status.applications.items()):
            replicas: dict[str, int] = {}
            for deployment in app.deployments.values():
                for state, count in deployment.replica_states.items():
                    replicas[str(getattr(state, "value", state))] = replicas.get(str(getattr(state, "value", state)),
                                                                                  0) + count
            entry: dict[str, Any] = {"name": name, "status": str(getattr(app.status, "value", app.status)),
                                     "message": app.message or None, "replicas": replicas}
            entry.update(_describe(serve, name))
            apps.append(entry)
        return {"applications": apps}
    finally:
        ray.shutdown()


def _describe(serve: Any, app_name: str) -> dict[str, Any]:
    """The application's own ``health()`` and ``info()``, or why they are missing."""
    out: dict[str, Any] = {}
    try:
        handle = serve.get_app_handle(app_name)
    except Exception as e:  # noqa: BLE001 - an application without an ingress handle is reported, not raised
        return {"error": f"no handle: {type(e).__name__}"}
    for method in ("health", "info"):
        try:
            value = getattr(handle, method).remote().result(timeout_s=_CALL_TIMEOUT_S)
            out[method] = msgspec.to_builtins(value)
        except Exception as e:  # noqa: BLE001
            out[method] = {"error": type(e).__name__}
    return out


def format_status(report: dict[str, Any]) -> str:
    if not report["applications"]:
        return "no Serve applications on this cluster"
    rows = [("APPLICATION", "STATUS", "REPLICAS", "KIND", "MODEL", "QUEUED", "SERVED", "FAILED", "ADAPTERS", "WORKERS")]
    for app in report["applications"]:
        health = app.get("health") or {}
        info = app.get("info") or {}
        settings = info.get("settings") or {}
        replicas = ", ".join(f"{n} {state.lower()}" for state, n in sorted(app["replicas"].items())) or "-"
        if "resident_adapters" in settings:  # a sampler: adapters loaded
            adapters = str(settings["resident_adapters"])
        elif health.get("runs") is not None:  # a model: runs whose adapter is on the device, of all held
            adapters = f"{health.get('resident_runs') or 0}/{health['runs']} resident"
        else:
            adapters = "-"
        workers = health.get("workers_alive")
        rows.append((app["name"], app["status"].lower(), replicas, str(info.get("kind") or health.get("kind") or "-"),
                     str(info.get("model_name") or "-"), str(health.get("queued", "-")), str(health.get("served", "-")),
                     str(health.get("failed", "-")), adapters, "-" if workers is None else str(workers)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
