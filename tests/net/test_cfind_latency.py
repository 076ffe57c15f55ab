"""The per-association speed-ups of bridge.net.pynetdicom_internals, and the plain-pynetdicom
fallback."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time

import pytest
from pydicom import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from bench.cfind import c_find
from bench.worklist_items import generate
from bridge.net import pynetdicom_internals as internals
from tests.net.test_cfind import _implicit, bridge, find


def _dataset() -> Dataset:
    ds = Dataset()
    ds.PatientID = ""
    ds.AccessionNumber = ""
    return ds


def _universal() -> bytes:
    return _implicit(_dataset())


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[type, bool]]:
    """(class, standard PDU log handler still bound) of each association the server opens."""
    seen: list[tuple[type, bool]] = []
    original = internals._quiet_logging

    def spy(assoc):
        original(assoc)
        bound = any(h is not None for h, _ in assoc.get_handlers(evt.EVT_PDU_SENT))
        seen.append((type(assoc), bound))

    monkeypatch.setattr(internals, "_quiet_logging", spy)
    return seen


def test_associations_get_the_brisk_reactor_and_no_log_handlers(tmp_path, seen) -> None:
    generate(tmp_path, 30)
    with bridge(tmp_path) as port:
        assert c_find(port, _universal(), "WLBRIDGE") == (30, 0x0000)
        status, answers, _ = find(port, _dataset())
    assert status == 0x0000 and len(answers) == 30
    assert seen and all(cls is internals._BriskAssociation and not bound for cls, bound in seen)


def test_without_speedups_pynetdicom_keeps_its_own_reactor(tmp_path, seen) -> None:
    generate(tmp_path, 30)
    with bridge(tmp_path, dicom_speedups=False) as port:
        assert c_find(port, _universal(), "WLBRIDGE") == (30, 0x0000)
        status, answers, _ = find(port, _dataset())
    assert status == 0x0000 and len(answers) == 30
    assert not seen  # nothing of pynetdicom's was touched


def test_log_handlers_stay_while_pynetdicom_logs(tmp_path, seen) -> None:
    generate(tmp_path, 3)
    logger = logging.getLogger(internals.HANDLERS_LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with bridge(tmp_path) as port:
            assert c_find(port, _universal(), "WLBRIDGE") == (3, 0x0000)
    finally:
        logger.setLevel(level)
    assert seen and all(bound for _, bound in seen)


def test_full_collection_waits_for_no_active_association(tmp_path, monkeypatch) -> None:
    """pynetdicom's gc.collect() per 60 connections is put off while an association is open,
    and runs once none is: driven by real connections, counted by the bridge's own server."""
    collected = threading.Event()
    monkeypatch.setattr(gc, "collect", lambda *a: collected.set() or 0)
    monkeypatch.setattr(internals.Server, "collect_every", 3)
    generate(tmp_path, 3)
    with bridge(tmp_path) as port:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", port, ae_title="WLBRIDGE")
        assert held.is_established
        for _ in range(5):
            assert c_find(port, _universal(), "WLBRIDGE") == (3, 0x0000)
        assert not collected.wait(1.5)  # the accept loop ran several times meanwhile
        held.release()
        assert collected.wait(15)


def test_quick_ack_is_armed_on_the_association_socket():
    import socket

    if internals._TCP_QUICKACK is None:
        pytest.skip("TCP_QUICKACK is Linux-only")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
        with client, server_side:
            server_side.setsockopt(socket.IPPROTO_TCP, internals._TCP_QUICKACK, 0)

            class AssociationSocket:  # what pynetdicom's DUL holds: the socket as `.socket`
                socket = server_side

            internals._ack_promptly(AssociationSocket())
            assert server_side.getsockopt(socket.IPPROTO_TCP, internals._TCP_QUICKACK) == 1
            server_side.close()
            internals._ack_promptly(AssociationSocket())  # a closed socket is left alone


def test_the_brisk_dul_rearms_quick_ack_on_every_turn(tmp_path, monkeypatch):
    armed = []
    monkeypatch.setattr(internals, "_ack_promptly", lambda sock: armed.append(sock))
    generate(tmp_path, 3)
    with bridge(tmp_path) as port:
        status, answers, _ = find(port, _dataset())
    assert status == 0x0000 and len(answers) == 3
    assert len(armed) > 3 and all(sock is not None for sock in armed)  # every turn of the loop


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_associations_are_cheap(tmp_path):
    """pynetdicom polls each association 1,000 times a second (~5% of a core each, measured);
    idle associations of the bridge wait on their socket instead."""
    from tests.conftest import start_bridge

    running = start_bridge(tmp_path)
    try:
        ae = AE(ae_title="IDLER")
        ae.add_requested_context(Verification)
        held = [ae.associate("127.0.0.1", running.dicom_port) for _ in range(5)]
        assert all(a.is_established for a in held)
        time.sleep(1.0)  # past the brisk moment after the association's start
        pid = running.process.pid
        before, started = _cpu_seconds(pid), time.monotonic()
        time.sleep(4.0)
        share = (_cpu_seconds(pid) - before) / (time.monotonic() - started) / len(held)
        for assoc in held:
            assoc.release()
    finally:
        running.stop()
    print(f"idle association: {share * 100:.2f}% of a core")
    assert share < 0.02
