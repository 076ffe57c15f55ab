"""HTTP on a PostgreSQL store: the handlers' database calls run in the thread pool, so a slow
database (here: a table another session locked) holds that request only, never the reactor
(/healthz, HL7, DICOM go on)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from bridge.storage.postgres.schema import upgrade
from tests.http_helpers import start_http_bridge
from tests.postgres import postgres, postgres_dsn, postgres_session  # noqa: F401

ANSWER_WITHIN = 8.0  # seconds /healthz may take on a loaded machine (the lock is held 20 s)


@pytest.fixture
def dsn(postgres_dsn: str) -> str:  # noqa: F811
    upgrade(postgres_dsn)
    return postgres_dsn


def test_an_mpps_listing_waiting_on_the_database_does_not_hold_the_reactor(tmp_path: Path, dsn):
    web = start_http_bridge(tmp_path, "--store", dsn)
    locker = psycopg.connect(dsn)
    try:
        assert web.call("GET", "/api/mpps").status == 200
        locker.execute("LOCK TABLE mpps_instances IN ACCESS EXCLUSIVE MODE")  # held: no commit
        listing: list = []
        waiting = threading.Thread(
            target=lambda: listing.append(web.call("GET", "/api/mpps")), daemon=True
        )
        waiting.start()
        time.sleep(0.5)  # not synchronisation: gives the listing time to reach the lock
        started = time.monotonic()
        assert web.call("GET", "/healthz", token=None).status == 200
        assert time.monotonic() - started < ANSWER_WITHIN
        assert waiting.is_alive() and not listing  # still waiting for the lock
        locker.rollback()
        waiting.join(30)
        assert listing and listing[0].status == 200
    finally:
        locker.close()
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)


def test_outbox_retry_and_drop_over_http_on_the_database_outbox(tmp_path: Path, dsn):
    from pydicom.uid import generate_uid

    from tests.dicom.test_mpps import final, in_progress, n_create, n_set, order
    from tests.http.test_http_outbox import outbound_config, parked, start
    from tests.ris_receiver import RISReceiver
    from tests.test_mpps_outbox import eventually

    ris = RISReceiver()
    ris.answer = "AE"  # refused until told otherwise: the messages park
    web = start(tmp_path, outbound_config(tmp_path, ris.port, max_attempts=2), "--store", dsn)
    try:
        order(web.bridge, control_id="OB1")
        uid = generate_uid()
        assert n_create(web.bridge, in_progress(), uid)[0].Status == 0
        (entry,) = eventually(lambda: parked(web), "the IP message parked after 2 refusals")
        assert web.call("POST", "/api/outbox/NO-SUCH-ID/drop").status == 404
        ris.answer = "AA"
        answer = web.call("POST", f"/api/outbox/{entry['control_id']}/retry")  # by MSH-10
        assert answer.status == 200, answer.body
        assert answer.json()["was"] == "parked" and answer.json()["id"] == entry["id"]
        (delivered,) = ris.wait_for(1)  # the lane was woken on the reactor
        assert delivered.control_id == entry["control_id"]
        ris.answer = "AE"
        assert n_set(web.bridge, uid, final("COMPLETED")).Status == 0
        (cm,) = eventually(lambda: parked(web), "the CM message parked")
        answer = web.call("POST", f"/api/outbox/{cm['id']}/drop")
        assert answer.status == 200 and answer.json()["was"] == "parked"
        assert web.call("POST", f"/api/outbox/{cm['id']}/drop").status == 404  # gone
        dropped = [r for r in web.bridge.log_records() if r.get("outcome") == "outbox-drop"]
        assert [r["control_id"] for r in dropped] == [cm["control_id"]]
    finally:
        assert web.bridge.stop() == 0, "".join(web.bridge.stderr_lines)
        ris.stop()
