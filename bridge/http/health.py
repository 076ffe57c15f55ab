"""/healthz (the process answers) and /readyz (it can do its work), for load balancers."""

from __future__ import annotations

import os
import shutil
from typing import Any

from bridge.http.metrics import outbox_state


def readiness(server: Any) -> tuple[bool, dict[str, Any]]:
    """(ready, {check: {"ok": bool, ...}}) over the listeners, index, folder (or database:
    `store`), disk, outbox."""
    s = server.settings
    checks: dict[str, dict[str, Any]] = {}
    checks["mllp"] = {"ok": server.mllp_port is not None}
    checks["dicom"] = {"ok": server.dicom_server is not None}
    checks["index"] = {"ok": bool(server.index.load_stats), "items": len(server.index)}
    store_health = getattr(server.storage, "health", None)
    if store_health is not None:  # a database: its last check (no query per probe)
        checks["store"] = store_health()
        folder = "."  # the disk of the logs and kept messages (working folder)
    else:
        folder = server.store.folder
        writable = os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)
        checks["worklist_writable"] = {"ok": writable, "folder": str(folder)}
    try:
        free_mb = shutil.disk_usage(folder).free / 1e6
        checks["disk_space"] = {
            "ok": free_mb >= s.ready_min_free_mb,
            "free_mb": round(free_mb, 1),
            "min_free_mb": s.ready_min_free_mb,
        }
    except OSError as exc:
        checks["disk_space"] = {"ok": False, "error": exc.strerror or str(exc)}
    outbox = outbox_state(server)
    if outbox is not None:
        age = float(outbox.get("oldest_age", 0) or 0)
        checks["outbox"] = {
            "ok": "error" not in outbox and age <= s.ready_outbox_max_age,
            **outbox,
            "max_age": s.ready_outbox_max_age,
        }
    ready = all(c["ok"] for c in checks.values())
    return ready, checks
