"""Contract tests: what bridge.net.pynetdicom_internals copied from, or relies on in, pynetdicom is
still what the installed pynetdicom has. An upgrade that changes any of it fails here first;
then re-read the upstream code, adapt the copy, and update the version and the hashes."""

from __future__ import annotations

import copy
import logging

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from bench.worklist_items import generate
from bridge.config import Settings
from bridge.net import pynetdicom_internals as internals
from tests.net.test_cfind import bridge


def test_the_installed_pynetdicom_is_the_version_the_copies_were_taken_from():
    assert pynetdicom.__version__ == internals.PYNETDICOM_VERSION
    assert internals.VERSION_MATCHES


@pytest.mark.parametrize("name", sorted(internals.UPSTREAM_SOURCES))
def test_the_upstream_functions_are_unchanged(name):
    assert internals.upstream_source_hash(name) == internals.UPSTREAM_SOURCES[name], (
        f"{name} changed upstream: compare it with the copy in bridge/pynetdicom_internals.py"
    )


def test_the_private_attributes_used_exist():
    assert internals.missing_private_attributes() == []


def test_another_version_turns_everything_off(monkeypatch):
    monkeypatch.setattr(internals, "VERSION_MATCHES", False)
    tuning = internals.Tuning(speedups=True)
    assert not tuning.bounds and not tuning.speedups
    assert "speed-ups and PDU bounds are off" in tuning.describe()
    assert internals.Tuning(speedups=False).describe()


def test_start_up_says_whether_the_speedups_are_on(tmp_path, caplog):
    generate(tmp_path, 1)
    with caplog.at_level(logging.INFO, logger="bridge.net.cfind"):
        with bridge(tmp_path):
            pass
        with bridge(tmp_path, dicom_speedups=False):
            pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DICOM:")]
    assert lines == [
        f"DICOM: pynetdicom {internals.PYNETDICOM_VERSION}: PDU bounds on, speed-ups on",
        f"DICOM: pynetdicom {internals.PYNETDICOM_VERSION}: PDU bounds on, speed-ups off "
        "(dicom-speedups = false)",
    ]


def test_without_speedups_associations_keep_pynetdicoms_classes_but_get_the_bounds(
    tmp_path, monkeypatch
):
    import bridge.net.cfind as cfind

    seen = []
    original = internals.prepare_association

    def spy(assoc, tuning, limits):
        original(assoc, tuning, limits)
        seen.append((type(assoc), type(assoc.dul)))

    monkeypatch.setattr(cfind, "prepare_association", spy)
    generate(tmp_path, 1)
    with bridge(tmp_path, dicom_speedups=False) as port:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="WLBRIDGE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0
        assoc.release()
    assert seen == [(Association, internals._BoundedDUL)]


def test_settings_default_to_the_speedups_on():
    assert Settings().dicom_speedups is True


def test_a_source_refused_again_and_again_is_closed_at_once_for_a_while():
    now = [100.0]
    penalties = internals.Penalties(limit=3, window=2.0, most_sources=2, clock=lambda: now[0])
    for _ in range(2):
        penalties.note("10.0.0.9")
    assert not penalties.penalised("10.0.0.9")
    penalties.note("10.0.0.9")
    assert penalties.penalised("10.0.0.9")
    assert not penalties.penalised("10.0.0.10")  # other sources are not affected
    now[0] += 2.5
    assert not penalties.penalised("10.0.0.9")  # the window passed
    for host in ("a", "b", "c"):  # the table never holds more than most_sources
        penalties.note(host)
    assert len(penalties.refusals) <= 2


@pytest.mark.parametrize("max_pdu", [0, 16382, 200, 64])
def test_answers_written_directly_are_the_pdus_pynetdicom_would_send(max_pdu):
    """FastSender.pdu builds the bytes of the PDUs that FastSender.__call__ hands to pynetdicom:
    one PDU an answer when it fits, else the command and then the fragments, each its own."""
    from pynetdicom.pdu import P_DATA_TF

    queued = []

    class UpperLayer:
        def send_pdu(self, primitive):
            queued.append(primitive)

    from pynetdicom.pdu_primitives import P_DATA

    command = internals._command_pdv(3, 7, "1.2.840.10008.5.1.4.31", 0xFF00)
    answer = bytes(range(256)) * 3 + b"tail"
    sender = internals.FastSender(UpperLayer(), 3, command, max_pdu, lambda r: r, P_DATA)
    assert sender(answer)
    expected = b""
    for primitive in queued:
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        expected += pdu.encode()
    assert sender.pdu(answer) == expected
    assert len(queued) == (1 if max_pdu in (0, 16382) else 1 + -(-len(answer) // (max_pdu - 6)))


def test_the_upper_layer_sends_under_the_lock_the_direct_writes_take():
    import socket

    from pynetdicom.transport import AssociationSocket

    ours, theirs = socket.socketpair()
    with ours, theirs:
        assoc = Association(AE(), "acceptor")
        wrapper = AssociationSocket(assoc, client_socket=ours)
        internals._lock_sends(wrapper)
        lock = wrapper.__dict__["_wlb_send_lock"]
        held = []
        real_send = ours.send
        wrapper.socket = type(
            "Spy", (), {"send": lambda _, b: held.append(lock.locked()) or real_send(b)}
        )()
        wrapper.send(b"0123")
        assert held == [True]
        assert theirs.recv(16) == b"0123"


def test_the_quick_final_response_is_the_one_pynetdicom_sends():
    """A C-FIND's final success response, sent from cached bytes, is byte for byte what
    pynetdicom's own send_msg queues; a failure response still goes pynetdicom's way."""
    from pynetdicom.dimse_primitives import C_FIND
    from pynetdicom.pdu import P_DATA_TF

    def encoded(status: int, quick: bool, comment: str | None = None) -> list[bytes]:
        assoc = Association(AE(), "acceptor")
        sent = []
        assoc.dul.send_pdu = sent.append
        if quick:
            internals._quick_final_response(assoc)
            internals._quiet_logging(assoc)  # as prepare_association does
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = 9
        rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.31"
        rsp.Status = status
        if comment:
            rsp.ErrorComment = comment
        assoc.dimse.send_msg(rsp, 5)
        out = []
        for primitive in sent:
            pdu = P_DATA_TF()
            pdu.from_primitive(primitive)
            out.append(pdu.encode())
        return out

    assert encoded(0x0000, quick=True) == encoded(0x0000, quick=False)
    hits = internals._final_pdv.cache_info().hits
    encoded(0x0000, quick=True)
    assert internals._final_pdv.cache_info().hits == hits + 1  # the quick path was taken
    assert encoded(0xA700, quick=True, comment="narrow it") == encoded(
        0xA700, quick=False, comment="narrow it"
    )


def test_a_served_c_find_ends_with_the_quick_final_response(tmp_path):
    from bench.worklist_items import query
    from tests.net.test_cfind import find

    def calls() -> int:
        info = internals._final_pdv.cache_info()
        return info.hits + info.misses

    generate(tmp_path, 3)
    before = calls()
    with bridge(tmp_path) as port:
        status, answers, _ = find(port, query({}, AccessionNumber=""))
    assert status == 0 and len(answers) == 3
    assert calls() == before + 1


def test_the_contexts_copied_for_an_association_equal_a_deepcopy_and_share_no_list():
    ae = AE()
    ae.add_supported_context(Verification)
    ae.add_supported_context("1.2.840.10008.5.1.4.31", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    contexts = internals._ContextList(ae.supported_contexts)
    copies = copy.deepcopy(contexts)
    reference = copy.deepcopy(list(ae.supported_contexts))
    assert [vars(c) for c in copies] == [vars(c) for c in reference]
    assert all(a is not b for a, b in zip(copies, contexts, strict=True))
    copies[0].transfer_syntax.append("1.2.3.4")
    copies[1].context_id = 3
    assert "1.2.3.4" in copies[0].transfer_syntax
    assert "1.2.3.4" not in contexts[0].transfer_syntax
    assert contexts[1].context_id is None
