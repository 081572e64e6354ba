"""Usage and the audit log on the routes the Tinker SDK's billing and audit methods read (``RestClient`` / ``AdminClient``
``get_billing_usage``, ``get_current_checkpoint_storage_usage``): the caller's own usage, every key's for an
admin key. Hourly buckets come from ``core.usage.UsageLedger``; no prices (``estimated_cost_usd`` is null: a
self-hosted server has no rate card); storage events are not reported (storage is current bytes, not
gigabyte-hours; see ``checkpoints/current``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..auth import Principal
from ..core import ControlPlane
from ..core.usage import HOUR_S, audit_window, usage_window

_GIB = 1024 ** 3


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class TinkerUsage:
    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane

    async def events(self, user: Principal, starting_on: str, ending_before: str) -> dict[str, Any]:
        start, end = usage_window(starting_on, ending_before)
        rows = await self.plane.store.usage_buckets(None if user.admin else user.id, start, end)
        data, sessions = [], {}
        for owner, hour, session_id, base_model, kind, quantity in rows:
            info: dict[str, Any] = {"type": kind}
            if kind == "checkpoint":
                info["count"] = quantity
            else:
                info["token_count"] = quantity
                if kind == "sampling_prefill":
                    info["cached"] = False
            data.append({"bucket_start": _iso(hour), "bucket_end": _iso(hour + HOUR_S), "base_model": base_model or None,
                         "user_id": owner, "user_name": owner, "session_id": session_id or None, "event_info": info})
            if session_id and session_id not in sessions:
                s = await self.plane.store.get_session(session_id)
                meta = s.user_metadata if s is not None else None
                sessions[session_id] = {"user_metadata": {str(k): str(v) for k, v in meta.items()} if meta else None}
        return {"data": data, "sessions": sessions, "cost_data_through": None}

    async def storage(self, user: Principal) -> dict[str, Any]:
        usage = await self.plane.store.usage([] if user.admin else [user.id])
        rows = [(owner, u) for owner, u in usage.items() if user.admin or owner == user.id]
        return {"effective_rate_usd_per_gigabyte_month": None, "data": [
            {"org_user_urn": owner, "user_name": owner, "checkpoint_count": u["checkpoints"],
             "size_bytes": u["checkpoint_bytes"], "size_gigabytes": u["checkpoint_bytes"] / _GIB}
            for owner, u in sorted(rows)]}

    async def audit(self, user: Principal, event_type: str, day: str | None) -> dict[str, Any]:
        """The day's audit entries (UTC; default today) about the caller's resources, or everyone's for an admin
        key. ``event_type``: ``all`` or ``checkpoints`` (this server has no projects, teams or organizations)."""
        prefix, start, end = audit_window(event_type, day)
        rows = await self.plane.store.audit_entries(None if user.admin else user.id, prefix, start, end,
                                                    self.plane.settings.limits.max_page_size)
        return {"entries": [{"timestamp": _iso_precise(t), "event": event, "event_details": {"owner": owner, **details},
                             "model_id": details.get("model_id"), "tinker_path": details.get("tinker_path"),
                             "purpose": details.get("purpose")} for t, owner, event, details in rows]}


def _iso_precise(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat().replace("+00:00", "Z")
