"""What two bridges share through PostgreSQL beside the worklist: the outbox (leased claims,
SKIP LOCKED), the retry memory of control IDs, the kept rejected messages, the MPPS instances;
and `wlbridge export` / `wlbridge import` between the database and a folder that wlmscpfs
serves."""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg
import pytest
from pydicom import Dataset

from bridge.storage.postgres import StoreUnavailable
from bridge.storage.postgres.memory import RejectedMessages, RetryMemory
from bridge.storage.postgres.mpps import PostgresMPPSStore
from bridge.storage.postgres.outbox import PostgresOutbox
from bridge.storage.postgres.schema import upgrade
from bridge.storage.postgres.transfer import export_folder, import_folder
from bridge.storage.postgres.worklist import PostgresWorklist, item_name
from bridge.storage.store import encode_file
from tests.dicom.test_worklist_item import items
from tests.hl7.test_order import base_orm, build
from tests.peers import findscu_answers, wlmscpfs
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401 (fixtures)
from tests.storage.test_postgres_store import item_bytes, key


@pytest.fixture
def dsn(postgres_dsn) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def message(control_id: str, accession: str) -> bytes:
    return (
        f"MSH|^~\\&|WLBRIDGE|RAD|RIS|HOSP|20261201||ORM^O01|{control_id}|P|2.5.1\r"
        f"ORC|SC|||||IP\rOBR|1|||||||||||||||||{accession}\r"
    ).encode()


def test_outbox_claims_one_bridge_at_a_time_and_in_order(dsn):
    a, b = PostgresOutbox(dsn, "bridge-a"), PostgresOutbox(dsn, "bridge-b")
    for n in (1, 2, 3):
        a.enqueue("ris", f"WLB{n}", message(f"WLB{n}", f"ACC{n}"), {f"acc:ACC{n}"})
    first = a.claim("ris", lease=60)
    assert first is not None and first.control_id == "WLB1"
    assert b.claim("ris", lease=60) is None  # the head is in flight on bridge a
    assert a.complete(first) is True
    second = b.claim("ris", lease=60)
    assert second is not None and second.control_id == "WLB2"  # in order, by the other bridge
    assert b.retry_later(second, delay=3600, reason="AE from the RIS")
    assert a.claim("ris", lease=60) is None  # the head waits out its backoff: nothing passes
    assert a.depth("ris") == 2
    a.close()
    b.close()


def test_a_dead_bridges_claim_is_taken_over_when_its_lease_ends(dsn):
    a, b = PostgresOutbox(dsn, "bridge-a"), PostgresOutbox(dsn, "bridge-b")
    data = message("WLB7", "ACC7")
    a.enqueue("ris", "WLB7", data, {"acc:ACC7"})
    taken = a.claim("ris", lease=1.0)  # bridge a then dies: it never completes nor renews
    assert taken is not None
    assert b.claim("ris", lease=60) is None
    deadline = time.monotonic() + 30
    again = None
    while again is None and time.monotonic() < deadline:
        time.sleep(0.2)  # a lease is a time: nothing to await but the clock
        again = b.claim("ris", lease=60)
    assert again is not None
    assert (again.id, again.control_id, again.data) == (taken.id, "WLB7", data)  # same MSH-10
    assert again.attempts == 2
    assert a.complete(taken) is False  # a late ACK on the dead bridge's claim changes nothing
    assert b.complete(again) is True
    assert b.depth() == 0


def test_claims_skip_a_lane_another_bridge_is_claiming(dsn):
    a = PostgresOutbox(dsn, "bridge-a")
    a.enqueue("ris", "WLB1", message("WLB1", "ACC1"))
    with psycopg.connect(dsn) as other:
        other.execute("SELECT * FROM outbox_lanes WHERE receiver = 'ris' FOR UPDATE")
        started = time.monotonic()
        assert a.claim("ris", lease=60) is None  # SKIP LOCKED: no wait on the other bridge
        assert time.monotonic() - started < 10
    assert a.claim("ris", lease=60) is not None
    a.close()


def test_a_parked_message_holds_its_own_order_only(dsn):
    a = PostgresOutbox(dsn, "bridge-a")
    a.enqueue("ris", "WLB1", message("WLB1", "ACC1"), {"acc:ACC1"})
    a.enqueue("ris", "WLB2", message("WLB2", "ACC1"), {"acc:ACC1"})
    a.enqueue("ris", "WLB3", message("WLB3", "ACC3"), {"acc:ACC3"})
    head = a.claim("ris", lease=60)
    assert a.park(head, "AR: unknown order")
    nxt = a.claim("ris", lease=60)
    assert nxt.control_id == "WLB3"  # WLB2 (same order as the parked one) waits
    assert a.complete(nxt)
    assert a.claim("ris", lease=60) is None
    assert a.unpark(head.id)
    assert a.claim("ris", lease=60).control_id == "WLB1"
    a.close()


def test_retry_memory_is_shared_and_bounded(dsn):
    one, two = RetryMemory(dsn, keep=5), RetryMemory(dsn, keep=5)
    one.remember("sender|MSG1", "digest1", b"MSH|...|ACK\rMSA|AA|MSG1\r")
    assert two.lookup("sender|MSG1") == ("digest1", b"MSH|...|ACK\rMSA|AA|MSG1\r")
    assert two.lookup("sender|MSG2") is None
    two.remember("sender|MSG1", "digest1b", b"AR")  # the latest answer wins
    assert one.lookup("sender|MSG1") == ("digest1b", b"AR")
    for n in range(10):
        one.remember(f"k{n}", "d", b"AA")
    one.prune()
    assert len(one) == 5 and one.lookup("k9") is not None and one.lookup("k0") is None
    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE recent_messages SET at = now() - interval '2 days' WHERE key = 'k9'")
    one.prune()
    assert one.lookup("k9") is None and len(one) == 4
    one.close()
    two.close()


def test_rejected_messages_are_kept_once_per_content(dsn):
    kept = RejectedMessages(dsn, keep=3)
    raw = message("BAD1", "ACC1")
    first = kept.keep_message(raw, "BAD1", "AR 207 PID^1^3 no patient ID")
    again = kept.keep_message(raw, "BAD1", "AE 204 unknown order")
    assert first == again
    assert kept.list() == [(first, "BAD1", "AE 204 unknown order", raw)]
    for n in range(5):
        kept.keep_message(message(f"BAD{n + 2}", "X"), f"BAD{n + 2}", "AR")
    assert [c for _, c, _, _ in kept.list()] == ["BAD4", "BAD5", "BAD6"]
    kept.close()


def test_mpps_instances_are_shared(dsn):
    one, two = PostgresMPPSStore(dsn), PostgresMPPSStore(dsn)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PatientID = "P1"
    ds.IssuerOfPatientID = "HOSP"
    one.put("1.2.3.4", ds)
    assert two.status("1.2.3.4") == "IN PROGRESS" and "1.2.3.4" in two and len(two) == 1
    ds.PerformedProcedureStepStatus = "COMPLETED"
    two.put("1.2.3.4", ds)  # the N-SET reached the other bridge
    assert one.get("1.2.3.4").PerformedProcedureStepStatus == "COMPLETED"
    assert one.of_patient("P1", "HOSP") == ["1.2.3.4"] and one.of_patient("P1", "ELSE") == []
    assert one.get("9.9") is None
    one.close()
    two.close()


def test_outbox_and_memory_report_an_unavailable_database(postgres):  # noqa: F811
    upgrade(postgres.dsn)
    box, memory = PostgresOutbox(postgres.dsn, "a"), RetryMemory(postgres.dsn)
    box.enqueue("ris", "WLB1", message("WLB1", "A"))
    memory.remember("k", "d", b"AA")
    postgres.stop()
    with pytest.raises(StoreUnavailable):
        box.claim("ris", lease=60)
    with pytest.raises(StoreUnavailable):
        memory.lookup("k")
    postgres.start()
    assert box.claim("ris", lease=60).control_id == "WLB1"
    assert memory.lookup("k") == ("d", b"AA")


def bridge_item(accession: str) -> bytes:
    """An item as the pipeline builds it from an ORM^O01 (every key wlmscpfs requires)."""
    built = items(build(base_orm(), {"OBR": {18: accession}, "PID": {3: f"P{accession}"}}))
    return encode_file(built[0], f"2.25.{sum(accession.encode())}")


def test_export_is_served_by_wlmscpfs(dsn, tmp_path):
    store = PostgresWorklist(dsn)
    store.put(key("E1", "WLQUERY"), bridge_item("E1"))
    store.put(key("E2", "WLQUERY"), bridge_item("E2"))
    store.put(key("GONE", "WLQUERY"), item_bytes("GONE"))
    store.delete(key("GONE", "WLQUERY"))
    stale = tmp_path / "export" / "WLQUERY" / "0123456789abcdef0123456789abcdef.wl"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(item_bytes("STALE"))
    report = export_folder(store, tmp_path / "export", prune=True)
    assert (report.written, report.removed) == (2, 1)
    assert (tmp_path / "export" / "WLQUERY" / "lockfile").exists()
    with wlmscpfs(tmp_path / "export") as port:
        answers = findscu_answers(
            port,
            ["PatientID", "AccessionNumber", "ScheduledProcedureStepSequence[0].Modality=CT"],
            called_aet="WLQUERY",
            out_dir=tmp_path / "answers",
        )
    assert sorted(str(a.AccessionNumber) for a in answers) == ["E1", "E2"]
    store.close()


def test_import_then_the_rows_exist_under_their_keys(dsn, tmp_path):
    folder = tmp_path / "worklist"
    (folder / "CT_ROOM").mkdir(parents=True)
    order = key("I1")  # the folder store names a file after its order's identity
    (folder / f"{item_name(order.identity)}.wl").write_bytes(item_bytes("I1", patient_id="PI"))
    (folder / "CT_ROOM" / "other-program.wl").write_bytes(item_bytes("I2"))
    (folder / "cut-short.wl").write_bytes(item_bytes("I3")[:200])
    (folder / "lockfile").touch()
    store = PostgresWorklist(dsn)
    report = import_folder(store, folder)
    assert report.written == 2
    assert len(report.skipped) == 1 and report.skipped[0].startswith("cut-short.wl")
    assert store.get(order) is not None  # a later message for the order finds its item
    assert store.find_by_patient("PI") != [] and store.count() == 2
    assert store.find_by_order(accession="I2")[0].partition == "CT_ROOM"
    store.put(order, item_bytes("I1", status="STARTED"))  # the same row, now with its identity
    assert store.count() == 2 and store.find_by_order(accession="I1") == [order]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM worklist_items").fetchone()[0] == 2
    store.close()


def test_export_and_import_commands(dsn, tmp_path):
    source = PostgresWorklist(dsn)
    source.put(key("K1"), item_bytes("K1"))
    source.close()
    out = tmp_path / "out"
    run = [sys.executable, "-m", "bridge"]
    exported = subprocess.run(
        [*run, "export", "--to", str(out), "--store", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    assert "1 item(s) written" in exported.stdout and len(list(out.glob("*.wl"))) == 1
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM worklist_items")
    imported = subprocess.run(
        [*run, "import", str(out), "--store", dsn], capture_output=True, text=True, timeout=60
    )
    assert imported.returncode == 0, imported.stderr
    check = PostgresWorklist(dsn)
    assert check.get(key("K1")) is not None
    check.close()
    missing = subprocess.run(
        [*run, "import", str(tmp_path / "nowhere"), "--store", dsn],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "not a folder" in missing.stderr
