"""A PostgreSQL bridge's rejected folder follows the shared table, and the reverse: real
`wlbridge serve` processes on one real PostgreSQL, messages refused over real MLLP.

- A message replayed from the table (HTTP on the other bridge, `wlbridge replay --store`)
  leaves the folder of the bridge that kept it for its `replayed/`; one refused again, or
  never replayed, stays.
- A copy replayed from the folder (`wlbridge replay FILE`, even fixed by hand first) finishes
  the table's row: /api/rejected no longer lists it, on either bridge.
- A copy kept after the replay of the same message is a refusal of its own: it stays.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bridge.ops.rejected_copies import RejectedCopies
from bridge.storage.postgres.memory import RejectedMessages, copy_key
from tests.conftest import ROOT
from tests.http.test_rejected_postgres import dsn, refused_by, start, stop  # noqa: F401
from tests.http_helpers import HttpBridge
from tests.messages import orm
from tests.peers import eventually
from tests.postgres import postgres_dsn, postgres_session  # noqa: F401 (fixtures)


def pending(bridge: HttpBridge) -> dict[str, Path]:
    """The folder's copies by control ID (file names: time-control-digest)."""
    folder = bridge.bridge.rejected_dir
    return {p.name.split("-", 1)[1].rsplit("-", 1)[0]: p for p in folder.glob("*.hl7")}


def replayed_names(bridge: HttpBridge) -> set[str]:
    return {p.name for p in (bridge.bridge.rejected_dir / "replayed").glob("*")}


def row_named(bridge: HttpBridge, control_id: str) -> str:
    rows = bridge.call("GET", "/api/rejected").json()["rejected"]
    return next(r["name"] for r in rows if r["control_id"] == control_id)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_copies_replayed_from_the_table_leave_the_keeping_bridges_folder(tmp_path, dsn):  # noqa: F811
    a = start(tmp_path, "a", dsn, only_production=True)  # refuses MSH-11 T
    b = start(tmp_path, "b", dsn)
    try:
        for control in ("CP-HTTP", "CP-CLI", "CP-AGAIN", "CP-KEPT"):
            refused_by(a, control, f"ACC-{control}")
        copies = pending(a)
        assert set(copies) == {"CP-HTTP", "CP-CLI", "CP-AGAIN", "CP-KEPT"}
        # replayed on the bridge that refuses it: refused again, the row and the copy stay
        again = a.call("POST", f"/api/rejected/{row_named(a, 'CP-AGAIN')}/replay")
        assert again.status == 422, again.body
        # replayed and accepted, by the other bridge and by the command
        done = b.call("POST", f"/api/rejected/{row_named(b, 'CP-HTTP')}/replay")
        assert done.status == 200 and done.json()["ack"] == "AA", done.body
        name = row_named(b, "CP-CLI")
        by_cli = cli("replay", "--store", dsn, "--port", str(b.bridge.mllp_port), name)
        assert by_cli.returncode == 0 and f"{name}: AA CP-CLI" in by_cli.stdout, by_cli

        moved = {copies["CP-HTTP"].name, copies["CP-CLI"].name}
        eventually(lambda: moved <= replayed_names(a), "the replayed copies moved", timeout=30)
        assert set(pending(a)) == {"CP-AGAIN", "CP-KEPT"}  # not accepted: still pending
        for control in ("CP-HTTP", "CP-CLI"):  # their reasons went with them
            assert copies[control].with_suffix(".reason").name in replayed_names(a)
        assert pending(b) == {} and replayed_names(b) == set()  # b kept nothing
        # what the folder still holds is what the table still lists
        assert {r["control_id"] for r in b.call("GET", "/api/rejected").json()["rejected"]} == {
            "CP-AGAIN",
            "CP-KEPT",
        }
    finally:
        stop(a, b)


def test_a_copy_replayed_from_the_folder_finishes_its_row(tmp_path, dsn):  # noqa: F811
    a = start(tmp_path, "a", dsn, only_production=True)
    b = start(tmp_path, "b", dsn)
    try:
        for control in ("FR-AS-KEPT", "FR-FIXED", "FR-LEFT"):
            refused_by(a, control, f"ACC-{control}")
        copies = pending(a)
        # as kept, sent to the other bridge (which accepts MSH-11 T) with the plain command
        as_kept = cli("replay", "--port", str(b.bridge.mllp_port), str(copies["FR-AS-KEPT"]))
        assert as_kept.returncode == 0 and "AA FR-AS-KEPT" in as_kept.stdout, as_kept
        # fixed by hand (now MSH-11 P: other bytes), sent to the bridge that refused it
        fixed = copies["FR-FIXED"]
        fixed.write_bytes(fixed.read_bytes().replace(b"|T|2.", b"|P|2."))
        by_hand = cli("replay", "--port", str(a.bridge.mllp_port), str(fixed))
        assert by_hand.returncode == 0 and "AA FR-FIXED" in by_hand.stdout, by_hand

        def listed() -> set[str]:
            return {r["control_id"] for r in b.call("GET", "/api/rejected").json()["rejected"]}

        eventually(lambda: listed() == {"FR-LEFT"}, "the rows of the files replayed finished")
        assert a.call("GET", "/api/status").json()["rejected"]["kept"] == 1
        assert set(pending(a)) == {"FR-LEFT"}
        gone = row_named(b, "FR-LEFT")  # still replayable from the table
        assert b.call("GET", f"/api/rejected/{gone}").status == 200
    finally:
        stop(a, b)


def test_a_copy_kept_after_the_replay_of_the_same_message_stays(tmp_path, dsn):  # noqa: F811
    shared = RejectedMessages(dsn)
    folder = tmp_path / "rejected"
    folder.mkdir()
    try:
        raw = orm(control_id="LATE-1", processing_id="T").encode()
        key = copy_key("LATE-1", hashlib.sha256(raw).hexdigest())
        shared.keep_message(raw, "LATE-1", "AR 103 MSH^1^11 processing ID")
        (row,) = shared.entries(1)
        before = datetime.now(UTC) - timedelta(seconds=30)
        old = folder / f"{before:%Y%m%dT%H%M%S%f}-{key}.hl7"
        old.write_bytes(raw)
        shared.claim(row.name, 1 << 20).finish(True)
        after = datetime.now(UTC) + timedelta(seconds=1)  # refused again since: its own copy
        new = folder / f"{after:%Y%m%dT%H%M%S%f}-{key}.hl7"
        new.write_bytes(raw)
        other = folder / f"{before:%Y%m%dT%H%M%S%f}-LATE-2-0a1b2c3d.hl7"  # never replayed
        other.write_bytes(b"MSH|")
        copies = RejectedCopies(folder, shared)
        found = copies.find()
        assert found == [old]
        assert copies.move(found) == [old.name]
        assert sorted(p.name for p in folder.glob("*.hl7")) == sorted([new.name, other.name])
        assert (folder / "replayed" / old.name).is_file()
        assert copies.find() == []  # moved once
    finally:
        shared.close()
