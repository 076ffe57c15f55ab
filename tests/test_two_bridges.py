"""Bridges on one PostgreSQL database (`store = "postgresql://…"`): real `wlbridge serve`
processes, a real server (tests.postgres), C-FIND with dcmtk's findscu."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from bridge.storage.postgres.schema import upgrade
from tests.conftest import RunningBridge, start_bridge
from tests.http_helpers import start_http_bridge
from tests.messages import orm
from tests.peers import findscu_answers, require_tool
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401

FOLLOW_TIMEOUT = 10.0  # seconds a change may take to reach the other bridge on a loaded machine


def send(port: int, message: str | bytes, timeout: float = 30.0) -> bytes:
    """One MLLP frame, its ACK."""
    data = message.encode("latin-1") if isinstance(message, str) else message
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(b"\x0b" + data + b"\x1c\r")
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer.strip(b"\x0b\x1c\r")


def ack_code(ack: bytes) -> str:
    for segment in ack.split(b"\r"):
        if segment.startswith(b"MSA|"):
            return segment.split(b"|")[1].decode()
    raise AssertionError(f"no MSA in {ack!r}")


def accessions(
    bridge: RunningBridge, out: Path, attribute: str = "ScheduledProcedureStepStatus"
) -> dict[str, str]:
    """Accession number -> the first step's `attribute` of what the bridge's C-FIND answers
    (one answer per accession number: one item per order)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    keys = ["AccessionNumber", f"ScheduledProcedureStepSequence[0].{attribute}"]
    found = {}
    for answer in findscu_answers(bridge.dicom_port, keys, out, called_aet=bridge.ae_title):
        steps = answer.get("ScheduledProcedureStepSequence") or []
        value = str(steps[0].get(attribute, "")) if steps else ""
        assert str(answer.AccessionNumber) not in found, "one item per order"
        found[str(answer.AccessionNumber)] = value
    return found


def wait_for(bridge: RunningBridge, out: Path, predicate, timeout: float = FOLLOW_TIMEOUT):
    """C-FIND until `predicate(answers)` holds (bounded): the other bridge's change arrives
    through LISTEN/NOTIFY, asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        found = accessions(bridge, out)
        if predicate(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)  # polling another process's C-FIND answers: no event to wait on


def serve_on(tmp_path: Path, name: str, dsn: str, *extra: str, **options) -> RunningBridge:
    folder = tmp_path / name
    folder.mkdir()
    return start_bridge(
        folder, "--store", dsn, *extra, worklist_dir=folder / "worklists", **options
    )


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    require_tool("findscu")
    upgrade(postgres_dsn)
    return postgres_dsn


def test_a_bridge_on_postgres_serves_its_orders_and_keeps_them_across_a_restart(tmp_path, dsn):
    bridge = serve_on(tmp_path, "a", dsn)
    try:
        assert ack_code(send(bridge.mllp_port, orm(control_id="M1", accession="ACC1"))) == "AA"
        assert accessions(bridge, tmp_path / "find") == {"ACC1": "SCHEDULED"}
        assert not list((tmp_path / "a" / "worklists").rglob("*.wl")), "no file is written"
    finally:
        assert bridge.stop() == 0, "".join(bridge.stderr_lines)
    again = serve_on(tmp_path, "a2", dsn)
    try:
        assert accessions(again, tmp_path / "find") == {"ACC1": "SCHEDULED"}
    finally:
        assert again.stop() == 0, "".join(again.stderr_lines)


def test_two_bridges_share_one_worklist(tmp_path, dsn):
    a = serve_on(tmp_path, "a", dsn)
    b = serve_on(tmp_path, "b", dsn)
    try:
        # An order sent to A is found on B.
        assert ack_code(send(a.mllp_port, orm(control_id="M1", accession="ACC1"))) == "AA"
        assert wait_for(b, tmp_path / "fb", lambda f: "ACC1" in f) == {"ACC1": "SCHEDULED"}
        # An XO sent to B for A's order replaces the one item, on both.
        xo = orm(control_id="M2", order_control="XO", accession="ACC1", modality="MR")
        assert ack_code(send(b.mllp_port, xo)) == "AA"
        arrived = orm(control_id="M3", order_control="SC", order_status="A", accession="ACC1")
        assert ack_code(send(b.mllp_port, arrived)) == "AA"
        assert accessions(b, tmp_path / "fb") == {"ACC1": "ARRIVED"}
        assert wait_for(a, tmp_path / "fa", lambda f: f.get("ACC1") == "ARRIVED") == {
            "ACC1": "ARRIVED"
        }
        # A retry of a control ID answered by A, sent to B: the same ACK, not applied again.
        first = send(a.mllp_port, orm(control_id="M4", accession="ACC2"))
        assert ack_code(first) == "AA"
        assert send(b.mllp_port, orm(control_id="M4", accession="ACC2")) == first
        duplicates = [r for r in b.log_records() if r.get("outcome") == "duplicate"]
        assert [r["control_id"] for r in duplicates] == ["M4"]
        # A CA on A removes the item from both.
        ca = orm(control_id="M5", order_control="CA", order_status="CA", accession="ACC1")
        assert ack_code(send(a.mllp_port, ca)) == "AA"
        assert "ACC1" not in accessions(a, tmp_path / "fa")
        assert wait_for(b, tmp_path / "fb", lambda f: "ACC1" not in f) == {"ACC2": "SCHEDULED"}
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_orders_get_ar_while_the_database_is_down_and_aa_once_it_is_back(
    tmp_path,
    postgres,  # noqa: F811
):
    require_tool("findscu")
    upgrade(postgres.dsn)
    (tmp_path / "a").mkdir()
    web = start_http_bridge(tmp_path / "a", "--store", postgres.dsn)
    a = web.bridge
    b = serve_on(tmp_path, "b", postgres.dsn)

    def ready() -> tuple[int, dict]:
        answer = web.call("GET", "/readyz", token=None)
        return answer.status, answer.json()

    def until(predicate, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.2)  # the store check runs every 2 s in the bridge: no event to await
        return predicate()

    try:
        assert until(lambda: ready()[0] == 200), ready()
        assert ack_code(send(a.mllp_port, orm(control_id="M1", accession="ACC1"))) == "AA"
        postgres.stop()
        assert until(lambda: ready()[0] == 503), ready()
        status, body = ready()
        assert body["checks"]["store"]["ok"] is False, body
        for n, bridge in enumerate((a, b, a)):
            ack = send(bridge.mllp_port, orm(control_id=f"D{n}", accession=f"ACCD{n}"))
            assert ack_code(ack) in ("AR", "AE"), ack
            assert b"ERR|" in ack and b"store unavailable" in ack
        # C-FIND goes on from the index meanwhile.
        assert accessions(a, tmp_path / "fa") == {"ACC1": "SCHEDULED"}
        postgres.start()
        assert until(lambda: ready()[0] == 200), ready()
        for n, bridge in enumerate((a, b)):
            ack = send(bridge.mllp_port, orm(control_id=f"U{n}", accession=f"ACCU{n}"))
            assert ack_code(ack) == "AA", ack
        # The change streams reconnected: each bridge sees the other's order.
        wanted = {"ACC1", "ACCU0", "ACCU1"}
        assert set(wait_for(a, tmp_path / "fa", lambda f: set(f) == wanted)) == wanted
        assert set(wait_for(b, tmp_path / "fb", lambda f: set(f) == wanted)) == wanted
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_a_store_without_schema_or_database_stops_start_up_with_a_sentence(tmp_path, postgres_dsn):  # noqa: F811
    import subprocess
    import sys

    from tests.conftest import ROOT

    def serve(url: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "bridge", "serve", "--store", url, "--mllp-port", "0",
               "--dicom-port", "0", "--worklist-dir", str(tmp_path / "wl"),
               "--translation-log", str(tmp_path / "t.log")]  # fmt: skip
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)

    no_schema = serve(postgres_dsn)
    assert no_schema.returncode == 2
    assert "store:" in no_schema.stderr and "wlbridge db upgrade --store" in no_schema.stderr
    assert "Traceback" not in no_schema.stderr
    nobody = serve("postgresql://someone:secret@127.0.0.1:1/none")
    assert nobody.returncode == 2
    assert "store:" in nobody.stderr and "cannot connect" in nobody.stderr
    assert "secret" not in nobody.stderr and "Traceback" not in nobody.stderr
    not_a_url = serve("mysql://x@y/z")
    assert not_a_url.returncode == 2 and "store" in not_a_url.stderr


def test_dicom_workers_follow_the_database_and_read_their_own_writes(tmp_path, dsn):
    a = serve_on(tmp_path, "a", dsn, "--dicom-workers", "2")
    b = serve_on(tmp_path, "b", dsn)
    try:
        for n in range(4):  # each C-FIND right after the ACK, on whichever worker accepts it
            ack = send(a.mllp_port, orm(control_id=f"W{n}", accession=f"ACCW{n}"))
            assert ack_code(ack) == "AA"
            assert f"ACCW{n}" in accessions(a, tmp_path / "fa")
        assert ack_code(send(b.mllp_port, orm(control_id="B1", accession="ACCB1"))) == "AA"
        wanted = {"ACCW0", "ACCW1", "ACCW2", "ACCW3", "ACCB1"}
        for _ in range(4):  # both workers have it
            assert set(wait_for(a, tmp_path / "fa", lambda f: set(f) == wanted)) == wanted
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_the_same_orders_sent_to_both_bridges_at_once_converge_to_one_item_each(tmp_path, dsn):
    import threading

    a = serve_on(tmp_path, "a", dsn)
    b = serve_on(tmp_path, "b", dsn)
    orders = 15
    acks: dict[str, list[str]] = {"a": [], "b": []}

    def stream(name: str, bridge: RunningBridge, modality: str) -> None:
        for n in range(orders):
            for control, kind in (("NW", "NW"), ("XO", "XO")):
                message = orm(control_id=f"{name}{kind}{n}", order_control=control,
                              accession=f"SAME{n}", modality=modality)  # fmt: skip
                acks[name].append(ack_code(send(bridge.mllp_port, message)))

    senders = [
        threading.Thread(target=stream, args=("a", a, "CT")),
        threading.Thread(target=stream, args=("b", b, "MR")),
    ]
    try:
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        assert acks["a"] == ["AA"] * 2 * orders and acks["b"] == ["AA"] * 2 * orders, acks
        wanted = {f"SAME{n}" for n in range(orders)}
        # one item per order on both (the two bridges' versions of an order replaced each
        # other under its lock), the same set on both
        assert set(wait_for(a, tmp_path / "fa", lambda f: set(f) == wanted)) == wanted
        assert set(wait_for(b, tmp_path / "fb", lambda f: set(f) == wanted)) == wanted
        # and the same version of each order on both: the last one committed
        in_db = accessions(a, tmp_path / "fa", "Modality")
        assert set(in_db.values()) <= {"CT", "MR"}
        deadline = time.monotonic() + FOLLOW_TIMEOUT
        while accessions(b, tmp_path / "fb", "Modality") != in_db:
            assert time.monotonic() < deadline, "the bridges disagree on an order's version"
            time.sleep(0.1)  # another process's answers: no event to wait on
            in_db = accessions(a, tmp_path / "fa", "Modality")
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_per_ae_layout_and_an_operator_s_status_change_over_http(tmp_path, dsn):
    (tmp_path / "a").mkdir()
    extra = ("--store", dsn, "--worklist-layout", "per-ae", "--ae-title", "CT_WL")
    web = start_http_bridge(tmp_path / "a", *extra)
    a = web.bridge
    a.ae_title = "CT_WL"  # the later --ae-title wins
    b = serve_on(tmp_path, "b", dsn, "--worklist-layout", "per-ae", ae_title="CT_WL")
    try:
        assert ack_code(send(b.mllp_port, orm(control_id="P1", accession="ACCP1"))) == "AA"
        assert wait_for(a, tmp_path / "fa", lambda f: "ACCP1" in f) == {"ACCP1": "SCHEDULED"}
        # the called AE title's partition is served though no sub-folder exists
        assert not (tmp_path / "a" / "worklists").exists() or not any(
            (tmp_path / "a" / "worklists").rglob("*.wl")
        )
        listed = web.call("GET", "/api/items?include_hidden=1").json()["items"]
        [item] = [i for i in listed if i.get("accession") == "ACCP1" or "ACCP1" in str(i)]
        answer = web.call("POST", f"/api/items/{item['id']}/status", body={"status": "ARRIVED"})
        assert answer.status == 200, answer.body
        assert wait_for(b, tmp_path / "fb", lambda f: f.get("ACCP1") == "ARRIVED") == {
            "ACCP1": "ARRIVED"
        }
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)


def test_an_mpps_received_by_one_bridge_changes_the_item_the_other_created(tmp_path, dsn):
    from pydicom.uid import generate_uid

    from tests.dicom.test_mpps import in_progress, n_create

    a = serve_on(tmp_path, "a", dsn)
    b = serve_on(tmp_path, "b", dsn)
    try:
        assert ack_code(send(a.mllp_port, orm(control_id="Q1"))) == "AA"  # ACC0001, SPS0001
        assert wait_for(b, tmp_path / "fb", lambda f: "ACC0001" in f) == {"ACC0001": "SCHEDULED"}
        status, _reply = n_create(b, in_progress(), generate_uid())
        assert status.Status == 0x0000
        # STARTED is hidden from C-FIND by default: gone from both once the change is in
        assert "ACC0001" not in accessions(b, tmp_path / "fb")
        assert wait_for(a, tmp_path / "fa", lambda f: "ACC0001" not in f) == {}
    finally:
        for bridge in (a, b):
            assert bridge.stop() == 0, "".join(bridge.stderr_lines)
