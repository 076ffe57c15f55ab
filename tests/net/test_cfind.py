"""The C-FIND SCP against real clients (dcmtk's findscu, pynetdicom) and dcmtk's wlmscpfs."""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import ModalityWorklistInformationFind, Verification

from bench.cfind import c_find
from bench.worklist_items import generate, make_item, write_item
from bench.worklist_items import query as q
from bridge.config import Settings
from bridge.dicom.matching import REQUIRED_TOP, QueryError, compile_query
from bridge.net.cfind import CompiledQueries, start_dicom_server
from bridge.storage.index import WorklistIndex
from tests import peers

DCMTK_EXAMPLES = Path("/usr/share/doc/dcmtk/examples")  # Debian's dcmtk package


@contextmanager
def bridge(folder: Path, **settings) -> Iterator[int]:
    """The bridge's C-FIND SCP over `folder` on a free port; yields the port."""
    s = Settings(worklist_dir=folder, host="127.0.0.1", dicom_port=peers.free_port(), **settings)
    index = WorklistIndex(s)
    index.load()
    server = start_dicom_server(s, index)
    try:
        yield s.dicom_port
    finally:
        server.ae.shutdown()


def find(port: int, query: Dataset, calling: str = "SCU", called: str = "WLBRIDGE",
         cancel_after: int | None = None) -> tuple[int, list[Dataset], Dataset | None]:  # fmt: skip
    """One C-FIND with pynetdicom as the client: (final status, answers, final status set)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association refused"
    answers = []
    final = None
    try:
        for status, identifier in assoc.send_c_find(
            query, ModalityWorklistInformationFind, msg_id=7
        ):
            if status.Status in (0xFF00, 0xFF01):
                answers.append(identifier)
                if cancel_after is not None and len(answers) == cancel_after:
                    assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
            else:
                final = status
    finally:
        assoc.release()
    return final.Status, answers, final


def _implicit(ds: Dataset) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def refused(port: int, calling: str = "SCU", called: str = "WLBRIDGE") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(ModalityWorklistInformationFind)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if assoc.is_established:
        assoc.release()
        return False
    return assoc.is_rejected


def accessions(answers) -> list[str]:
    return [a.AccessionNumber for a in answers]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 generated items (8 modalities, station <modality>1, 5 days from 2024-01-05), plus
    items with accented names, two station AE titles, and a completed step."""
    path = tmp_path_factory.mktemp("worklist")
    generate(path, 40)
    write_item(path / "utf8.wl", make_item("UTF8", patient_id="PU", patient_name="Dvořák^Antonín",
                                           charset="ISO_IR 192"))  # fmt: skip
    write_item(path / "latin1.wl", make_item("LATIN1", patient_id="PL",
                                             patient_name="Gaël^Zoë"))  # fmt: skip
    write_item(path / "two.wl", make_item("TWO", station_aets=["US1", "US9"], modality="US",
                                          date="20240120"))  # fmt: skip
    write_item(path / "done.wl", make_item("DONE", status="COMPLETED", date="20240121"))
    return path


def test_c_echo(folder):
    with bridge(folder) as port:
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_findscu_selective_queries(folder, tmp_path, speedups):
    with bridge(folder, dicom_speedups=speedups) as port:
        cases = [
            (["PatientID=P0000003", "AccessionNumber"], ["A0000006", "A0000007"]),
            (["(0040,0100)[0].ScheduledStationAETitle=MR1",
              "(0040,0100)[0].ScheduledProcedureStepStartDate=20240105", "AccessionNumber"],
             ["A0000001"]),
            (["(0040,0100)[0].ScheduledStationAETitle=US9", "AccessionNumber"], ["TWO"]),
            (["(0040,0100)[0].Modality=M?", "(0040,0100)[0].ScheduledProcedureStepStartDate="
              "20240106-20240106", "AccessionNumber"], ["A0000009", "A0000014"]),
        ]  # fmt: skip
        for i, (keys, expected) in enumerate(cases):
            out = tmp_path / f"q{i}"
            out.mkdir()
            result = peers.findscu(port, keys, out_dir=out)
            assert result.returncode == 0, result.stderr
            assert sorted(accessions(peers.read_answers(out))) == expected, keys


@pytest.mark.parametrize(
    "name, asked, charset",
    [("Dvořák^Antonín", "DVOŘÁK*", "ISO_IR 192"), ("Gaël^Zoë", "gaël^zoë", "ISO_IR 100")],
)
def test_accented_names_end_to_end(folder, tmp_path, name, asked, charset):
    with bridge(folder) as port:
        query_file = tmp_path / "q.dcm"
        query = q(PatientName=asked, AccessionNumber="")
        query.SpecificCharacterSet = charset
        write_item(query_file, query)
        result = peers.findscu_file(port, query_file, out_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        answers = peers.read_answers(tmp_path)
        assert [str(a.PatientName) for a in answers] == [name]
        assert answers[0].SpecificCharacterSet == charset


@pytest.fixture(scope="module")
def offis(tmp_path_factory) -> Path:
    """dcmtk's example worklist database as DICOM files, in the per-AE layout."""
    db = DCMTK_EXAMPLES / "wlistdb" / "OFFIS"
    if not db.is_dir():
        if peers.IN_CI:
            pytest.fail(f"dcmtk examples missing at {db}")
        pytest.skip("dcmtk examples not installed")
    root = tmp_path_factory.mktemp("wlistdb")
    (root / "OFFIS").mkdir()
    (root / "OFFIS" / "lockfile").touch()  # wlmscpfs needs it; the bridge does not
    for dump in sorted(db.glob("wklist*.dump*")):
        name = dump.name.split(".")[0]
        peers.dump2dcm(dump, root / "OFFIS" / f"{name}.wl")
    return root


# Answers the standard gives for dcmtk's 13 example queries on its example database:
# most ask for keys universally; the station AE titles AA2/AA4 and modality DD match
# nothing; wlistqry5 asks for steps starting at 12:00 or later.
EXAMPLE_ANSWERS = {
    0: 10, 1: 10, 2: 0, 3: 10, 4: 0, 5: 6, 6: 0, 7: 0, 8: 0, 9: 0, 10: 10, 11: 10, 12: 0,
}  # fmt: skip


@pytest.mark.parametrize("number", sorted(EXAMPLE_ANSWERS))
def test_dcmtk_example_queries(offis, tmp_path, number):
    dump = next((DCMTK_EXAMPLES / "wlistqry").glob(f"wlistqry{number}.dump*"))
    query_file = peers.dump2dcm(dump, tmp_path / "query.dcm")
    import pydicom

    query = pydicom.dcmread(query_file)
    with bridge(offis, worklist_layout="per-ae") as port:
        out = tmp_path / "out"
        out.mkdir()
        result = peers.findscu_file(port, query_file, called_aet="OFFIS", out_dir=out)
        assert result.returncode == 0, result.stderr
        answers = peers.read_answers(out)
    assert len(answers) == EXAMPLE_ANSWERS[number]
    requested = {e.keyword for e in query if e.tag.group != 0x0002}
    for answer in answers:
        got = {e.keyword for e in answer} - {"SpecificCharacterSet"}
        assert got <= requested
        # Requested sequences the item lacks are left out unless Table K.6-1 makes them Type 2
        for keyword in requested - got:
            assert query[keyword].VR == "SQ" and int(query[keyword].tag) not in REQUIRED_TOP
        assert answer.SpecificCharacterSet == "ISO_IR 100"
    if number == 5:
        times = sorted(a.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartTime
                       for a in answers)  # fmt: skip
        assert times == ["135558", "140956", "153600", "160700", "165709", "175609"]
        step = answers[0].ScheduledProcedureStepSequence[0]
        assert {e.keyword for e in step} == {
            "Modality", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
            "ScheduledPerformingPhysicianName", "ScheduledProcedureStepID"}  # fmt: skip


def canonical(ds: Dataset) -> tuple:
    """A comparable form of an answer: keyword and value, sequences recursively."""
    out = []
    for elem in ds:
        if elem.keyword == "SpecificCharacterSet" or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            out.append((elem.keyword, tuple(canonical(i) for i in elem.value)))
        else:
            out.append((elem.keyword, str(elem.value if elem.value is not None else "")))
    return tuple(sorted(out))


# Queries on which wlmscpfs follows the standard (it ignores keys outside its fixed list and
# has no wildcards on IDs, AE titles or modality: those are left out here).
DIFFERENTIAL = [
    ["PatientID=AV35674"],
    ["PatientName=VIVALDI^ANTONIO"],
    ["PatientName=BEETHOVEN*"],
    ["(0040,0100)[0].Modality=CT"],
    ["(0040,0100)[0].ScheduledStationAETitle=AA32"],  # one item holds it as second value
    ["(0040,0100)[0].ScheduledStationAETitle=NN77"],
    ["(0040,0100)[0].ScheduledProcedureStepStartDate=19960101-19961231"],
    ["(0040,0100)[0].ScheduledProcedureStepStartDate=-19951231"],
    ["(0040,0100)[0].ScheduledProcedureStepStartDate=19960406"],
    ["(0040,0100)[0].ScheduledProcedureStepStartTime=120000-"],
    ["AccessionNumber=00007"],
]
RETURN_KEYS = [
    "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "RequestedProcedureID", "(0040,0100)[0].Modality",
    "(0040,0100)[0].ScheduledStationAETitle", "(0040,0100)[0].ScheduledProcedureStepStartDate",
    "(0040,0100)[0].ScheduledProcedureStepStartTime", "(0040,0100)[0].ScheduledProcedureStepID",
]  # fmt: skip


def test_same_answers_as_wlmscpfs(offis, tmp_path):
    with peers.wlmscpfs(offis) as theirs, bridge(offis, worklist_layout="per-ae") as ours:
        for i, keys in enumerate(DIFFERENTIAL):
            given = {k.split("=")[0] for k in keys}
            full = keys + [k for k in RETURN_KEYS if k not in given]
            results = []
            for name, port in (("wlmscpfs", theirs), ("bridge", ours)):
                out = tmp_path / f"{i}-{name}"
                out.mkdir()
                result = peers.findscu(port, full, called_aet="OFFIS", out_dir=out)
                assert result.returncode == 0, (name, result.stderr)
                results.append(sorted(canonical(a) for a in peers.read_answers(out)))
            assert results[0] == results[1], keys
            assert results[1], f"{keys} should match something in the example database"


def _serving_many(folder: Path, count: int, **settings):
    """An SCP whose index holds `count` copies of one item (accession MANY): long answers."""
    s = Settings(worklist_dir=folder, host="127.0.0.1", dicom_port=peers.free_port(), **settings)
    index = WorklistIndex(s)
    index.load()
    item = make_item("MANY")
    for i in range(count):
        index.put(folder / f"{i}.wl", item)
    return s, start_dicom_server(s, index)


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_c_cancel_stops_the_answers(tmp_path, speedups):
    # Enough matches that the answers are still streaming when the C-CANCEL arrives (the
    # batched writer fills the loopback socket buffers, a few thousand answers, before the
    # client has even read the first).
    s, server = _serving_many(tmp_path, 20000, dicom_speedups=speedups)
    try:
        # pynetdicom as the client: cancel after the third answer.
        status, answers, _ = find(s.dicom_port, q(AccessionNumber="", PatientName=""),
                                  cancel_after=3)  # fmt: skip
        assert status == 0xFE00
        assert 3 <= len(answers) < 20000
        # A client that reads as fast as answers come: the server must stop within a few.
        query = _implicit(q(AccessionNumber="", PatientName=""))
        answers_sent, status = c_find(s.dicom_port, query, "WLBRIDGE", cancel_after=1)
    finally:
        server.ae.shutdown()
    assert status == 0xFE00
    # Stopped well before the 20,000 matches ran out: what follows the cancel is what was
    # already written or in the socket buffers (hundreds to a few thousand answers).
    assert answers_sent < 12000


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_own_items_only(folder, speedups):
    with bridge(folder, own_items_only=True, dicom_speedups=speedups) as port:
        status, answers, _ = find(port, q(AccessionNumber="", sps={"Modality": ""}),
                                  calling="US9")  # fmt: skip
        assert status == 0 and accessions(answers) == ["TWO"]
        status, answers, _ = find(port, q(AccessionNumber=""), calling="NOSTATION")
        assert status == 0 and answers == []
        # A query naming a station is answered for that station.
        mr1 = q(AccessionNumber="", sps={"ScheduledStationAETitle": "MR1"})
        status, answers, _ = find(port, mr1, calling="US9")
        assert len(answers) == 5
        # Wildcards and lists do not name a station: they are matched within one's own steps.
        for station in ("*", "**", "?*", "*1", "*9", "US?", "MR1\\US9", "US9\\MR1"):
            wild = q(AccessionNumber="", sps={"ScheduledStationAETitle": station})
            status, answers, _ = find(port, wild, calling="US9")
            assert status == 0 and accessions(answers) == ["TWO"], station
        for station in ("*8", "MR1\\CT1", "CT?"):
            wild = q(AccessionNumber="", sps={"ScheduledStationAETitle": station})
            status, answers, _ = find(port, wild, calling="US9")
            assert status == 0 and answers == [], station
    with bridge(folder) as port:  # off: everyone's items
        status, answers, _ = find(port, q(AccessionNumber=""), calling="US9")
        assert len(answers) == 43  # 44 items, one completed


def test_hidden_statuses(folder):
    with bridge(folder) as port:
        _, answers, _ = find(port, q(AccessionNumber="DONE"))
        assert answers == []
        asked = q(AccessionNumber="DONE", sps={"ScheduledProcedureStepStatus": "COMPLETED"})
        _, answers, _ = find(port, asked)
        assert accessions(answers) == ["DONE"]


def test_per_ae_layout_and_called_ae_titles(tmp_path):
    generate(tmp_path / "CTSCANNER", 3, prefix="ct")
    generate(tmp_path / "MRSCANNER", 2, prefix="mr")
    (tmp_path / "outside.wl").write_bytes((tmp_path / "CTSCANNER" / "ctitem0000000.wl")
                                          .read_bytes())  # fmt: skip
    with bridge(tmp_path, worklist_layout="per-ae") as port:
        _, answers, _ = find(port, q(AccessionNumber=""), called="CTSCANNER")
        assert len(answers) == 3
        _, answers, _ = find(port, q(AccessionNumber=""), called="MRSCANNER")
        assert len(answers) == 2
        for called in ("NOSUCH", "..", ".", "CTSCANNER/..", "../CTSCANNER"):
            assert refused(port, called=called), called
        result = peers.findscu(port, ["AccessionNumber"], called_aet="NOSUCH")
        assert result.returncode != 0


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_max_answers(folder, speedups):
    with bridge(folder, max_answers=3, dicom_speedups=speedups) as port:
        status, answers, final = find(port, q(AccessionNumber="",
                                              sps={"ScheduledStationAETitle": "CT1"}))  # fmt: skip
        assert status == 0xA700
        assert len(answers) == 3
        assert "7 matches, 3 sent" in final.ErrorComment  # 5 generated + 2 accented
        status, answers, _ = find(port, q(PatientID="P0000003"))  # 2 answers: under the limit
        assert status == 0x0000 and len(answers) == 2


def test_allowed_calling_ae_titles(folder):
    with bridge(folder, allowed_calling_aets=["CT1", "MR1"]) as port:
        assert refused(port, calling="INTRUDER")
        status, answers, _ = find(port, q(PatientID="P0000003"), calling="MR1")
        assert status == 0 and len(answers) == 2
        result = peers.findscu(port, ["PatientID=P0000003"], calling_aet="INTRUDER")
        assert result.returncode != 0


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_bad_query_values_fail_with_a900(folder):
    with bridge(folder) as port:
        status, answers, final = find(port, q(sps={"ScheduledProcedureStepStartDate": "2024*"}))
        assert status == 0xA900 and answers == []
        assert "wildcards" in final.ErrorComment


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_unsupported_matching_key_gives_ff01(folder, speedups):
    with bridge(folder, dicom_speedups=speedups) as port:
        query = q(PatientID="P0000003")
        query.add_new(0x00091010, "OB", b"\x01\x02")
        ae = AE()
        ae.add_requested_context(ModalityWorklistInformationFind, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", port)
        statuses = [s.Status for s, _ in assoc.send_c_find(query, ModalityWorklistInformationFind)]
        assoc.release()
        assert statuses == [0xFF01, 0xFF01, 0x0000]


@pytest.mark.parametrize("speedups", [True, False], ids=["speedups", "plain-pynetdicom"])
def test_dcmjs_dimse_pregnancy_status_zero_is_a_return_key(folder, speedups):
    """dcmjs-dimse's stock worklist query: PregnancyStatus = 0 and SpecificCharacterSet asked
    for. Every item comes back, with FF01, its PregnancyStatus, and a character set."""
    with bridge(folder, dicom_speedups=speedups) as port:
        query = q(PatientID="P0000003", PatientName="", PregnancyStatus=0)
        query.SpecificCharacterSet = ""
        ae = AE()
        ae.add_requested_context(ModalityWorklistInformationFind)
        assoc = ae.associate("127.0.0.1", port)
        results = list(assoc.send_c_find(query, ModalityWorklistInformationFind))
        assoc.release()
    assert [s.Status for s, _ in results] == [0xFF01, 0xFF01, 0x0000]
    for _status, answer in results[:2]:
        assert answer.PregnancyStatus == 4
        assert answer.SpecificCharacterSet  # never zero length


def test_a_search_past_its_time_budget_is_answered_a700(tmp_path):
    s, server = _serving_many(tmp_path, 3000, max_search_time=0.0)
    try:
        status, answers, final = find(s.dicom_port, q(AccessionNumber="", PatientName="*?*"))
    finally:
        server.ae.shutdown()
    assert status == 0xA700 and answers == []
    assert "search longer than" in final.ErrorComment


def test_each_query_is_logged(folder, caplog):
    with caplog.at_level(logging.INFO, logger="bridge.net.cfind"), bridge(folder) as port:
        find(port, q(PatientID="P0000003", PatientName=""), calling="CT1")
    lines = [r.getMessage() for r in caplog.records
             if r.name == "bridge.net.cfind" and r.getMessage().startswith("C-FIND")]  # fmt: skip
    assert len(lines) == 1
    assert "CT1->WLBRIDGE" in lines[0] and "PatientID=P0000003" in lines[0]
    assert "2 answers" in lines[0] and " ms" in lines[0]


def test_pynetdicom_does_not_log_identifiers(folder, caplog):
    with caplog.at_level(logging.NOTSET), bridge(folder) as port:
        find(port, q(PatientID="P0000003", PatientName=""))
    assert not [r for r in caplog.records if r.name.startswith("pynetdicom")
                and "P0000003" in r.getMessage()]  # fmt: skip


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_fast_answers_equal_pynetdicom_answers(folder, monkeypatch, syntax):
    """Answers sent by the bridge's own sender are those pynetdicom sends from Query.answer."""
    from bridge.net.pynetdicom_internals import FastSender

    created = []
    original = FastSender.create

    def counting(*args):
        sender = original(*args)
        created.append(sender is not None)
        return sender

    def run() -> list[tuple]:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(ModalityWorklistInformationFind, syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="WLBRIDGE")
        query = q(AccessionNumber="", PatientName="", PatientID="", PatientWeight="",
                  sps={"Modality": "", "ScheduledProcedureStepStartDate": "",
                       "ScheduledStationAETitle": ""})  # fmt: skip
        query.ReferencedStudySequence = []
        got = [(s.Status, canonical(i) if i is not None else None)
               for s, i in assoc.send_c_find(query, ModalityWorklistInformationFind)]  # fmt: skip
        assoc.release()
        return got

    with bridge(folder) as port:
        monkeypatch.setattr(FastSender, "create", counting)
        fast = run()
        monkeypatch.setattr(FastSender, "create", lambda *args: None)
        slow = run()
    assert created == [True]
    assert len(fast) == 44 and fast[-1] == (0x0000, None)  # 43 answers (one completed) + final
    assert fast == slow


def test_a_peer_that_stops_reading_is_aborted_after_the_dimse_timeout(tmp_path):
    from bench.cfind import _associate_rq, _command, _pdata, _recv_pdu

    s, server = _serving_many(tmp_path, 20000, dimse_timeout=1.0)
    gave_up = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "peer stopped reading" in record.getMessage():
                gave_up.set()

    watch = Watch()
    log = logging.getLogger("bridge.net.cfind")
    log.addHandler(watch)
    log.setLevel(logging.INFO)
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
            sock.settimeout(30)
            sock.connect(("127.0.0.1", s.dicom_port))
            sock.sendall(_associate_rq("WLBRIDGE", "STALLER"))
            assert _recv_pdu(sock)[0] == 2
            wide = q(  # ~0.5 KB answers: 10 MB in all, more than the sockets' buffers hold
                sps={"ScheduledStationAETitle": "", "ScheduledProcedureStepStartDate": "",
                     "ScheduledProcedureStepDescription": "", "ScheduledProcedureStepID": ""},
                PatientName="", PatientID="", AccessionNumber="", StudyInstanceUID="",
                RequestedProcedureDescription="", ReferringPhysicianName="", PatientBirthDate="",
            )  # fmt: skip
            sock.sendall(_pdata(_command(), True) + _pdata(_implicit(wide), False))
            # ...and never reads: the server must give up on it rather than queue 20,000 answers
            assert gave_up.wait(30)
        status, answers, _ = find(s.dicom_port, q(AccessionNumber="OTHER"))  # still serving
        assert status == 0x0000 and answers == []
    finally:
        log.removeHandler(watch)
        server.ae.shutdown()


@pytest.mark.parametrize(
    "name, value",
    [("max_associate_request_size", 100), ("max_identifier_size", 0), ("max_search_time", 0.0)],
)
def test_dicom_limits_out_of_range_are_refused_naming_the_setting(name, value):
    from bridge.app.settings_checks import load_settings

    with pytest.raises(ValueError, match=name.replace("_", "-")):
        load_settings(overrides={name: value})


def test_a_repeated_query_sees_every_change_of_the_items_it_answers(tmp_path):
    """Answers are cached by identifier and record: the same query asked again, after an item
    changed, was added or removed, gets the worklist as it is now, in both transfer syntaxes."""
    s = Settings(worklist_dir=tmp_path, host="127.0.0.1", dicom_port=peers.free_port())
    index = WorklistIndex(s)
    index.load()
    for i in range(5):
        index.put(tmp_path / f"{i}.wl", make_item(f"A{i}", patient_name=f"OLD^{i}"))
    server = start_dicom_server(s, index)
    query = q(AccessionNumber="", PatientName="")

    def names(syntax: str) -> list[str]:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(ModalityWorklistInformationFind, syntax)
        assoc = ae.associate("127.0.0.1", s.dicom_port, ae_title="WLBRIDGE")
        answers = assoc.send_c_find(query, ModalityWorklistInformationFind)
        got = [str(i.PatientName) for st, i in answers if st.Status == 0xFF00]
        assoc.release()
        return sorted(got)

    try:
        for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            assert names(syntax) == [f"OLD^{i}" for i in range(5)]
            assert names(syntax) == [f"OLD^{i}" for i in range(5)]  # from the cache
        index.put(tmp_path / "2.wl", make_item("A2", patient_name="NEW^2"))
        index.put(tmp_path / "9.wl", make_item("A9", patient_name="ADDED^9"))
        index.discard(tmp_path / "0.wl")
        expected = sorted(["OLD^1", "NEW^2", "OLD^3", "OLD^4", "ADDED^9"])
        for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
            assert names(syntax) == expected
    finally:
        server.ae.shutdown()


def test_own_items_only_answers_are_cached_per_calling_ae_title(folder):
    with bridge(folder, own_items_only=True) as port:
        for _ in range(2):  # the second round from the cache
            _, answers, _ = find(port, q(AccessionNumber="", sps={"Modality": ""}), calling="US9")
            assert accessions(answers) == ["TWO"]
            _, answers, _ = find(port, q(AccessionNumber="", sps={"Modality": ""}), calling="CT1")
            assert "TWO" not in accessions(answers) and answers


def test_the_answer_cache_holds_at_most_its_total_over_all_queries(tmp_path, monkeypatch):
    """Distinct queries (a date each, say) never grow the cache past TOTAL answers: the least
    recently asked are dropped, and answers stay right."""
    from bridge.net.cfind import AnswerCache

    monkeypatch.setattr(AnswerCache, "TOTAL", 12)
    s = Settings(worklist_dir=tmp_path, host="127.0.0.1", dicom_port=peers.free_port())
    index = WorklistIndex(s)
    index.load()
    for i in range(5):
        index.put(tmp_path / f"{i}.wl", make_item(f"A{i}", patient_name=f"P^{i}"))
    server = start_dicom_server(s, index)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(ModalityWorklistInformationFind)
    try:
        for round_ in range(2):
            for n in range(8):  # 8 distinct identifiers of 5 answers each: 40 > 12
                assoc = ae.associate("127.0.0.1", s.dicom_port, ae_title="WLBRIDGE")
                query = q(AccessionNumber="", PatientName="", PatientID=f"*{'*' * n}")
                answers = assoc.send_c_find(query, ModalityWorklistInformationFind)
                got = sorted(str(i.PatientName) for st, i in answers if st.Status == 0xFF00)
                assoc.release()
                assert got == [f"P^{i}" for i in range(5)], (round_, n)
                cache = server.worklist_scp.answer_cache
                held = sum(len(a) for a in cache.queries.values())
                assert held == len(cache) <= AnswerCache.TOTAL
    finally:
        server.ae.shutdown()


class _Identified:
    """What CompiledQueries reads of a C-FIND event."""

    def __init__(self, raw: bytes, syntax: str = "1.2.840.10008.1.2.1") -> None:
        self.request = SimpleNamespace(Identifier=io.BytesIO(raw))
        self.context = SimpleNamespace(transfer_syntax=syntax)


def _counting_compiler(calls: list):
    def compile_(event, calling):
        calls.append((event.request.Identifier.getvalue(), calling))
        return compile_query(q(sps={"ScheduledStationAETitle": calling}))

    return compile_


def test_an_identifier_asked_again_is_compiled_once_and_each_search_gets_its_own_state():
    cache = CompiledQueries(own_items_only=False)
    calls: list = []
    first = cache.query(_Identified(b"same"), "CT1", _counting_compiler(calls))
    first.guard, first.matched = (lambda: None), 99  # one search's state
    second = cache.query(_Identified(b"same"), "CT2", _counting_compiler(calls))
    assert len(calls) == 1
    assert second is not first and second.guard is None and second.matched == 0
    assert second.tests is first.tests  # the compiled part is shared
    cache.query(_Identified(b"same", "1.2.840.10008.1.2"), "CT1", _counting_compiler(calls))
    cache.query(_Identified(b"other"), "CT1", _counting_compiler(calls))
    assert len(calls) == 3  # another transfer syntax, another identifier: compiled


def test_with_own_items_only_the_calling_ae_title_is_part_of_the_compiled_query():
    cache = CompiledQueries(own_items_only=True)
    calls: list = []
    cache.query(_Identified(b"same"), "CT1", _counting_compiler(calls))
    cache.query(_Identified(b"same"), "CT2", _counting_compiler(calls))
    cache.query(_Identified(b"same"), "CT1", _counting_compiler(calls))
    assert [calling for _raw, calling in calls] == ["CT1", "CT2"]


def test_refused_long_and_many_identifiers_stay_bounded():
    cache = CompiledQueries(own_items_only=False)
    calls: list = []

    def refuse(event, calling):
        calls.append(calling)
        raise QueryError("bad range")

    for _ in range(2):
        with pytest.raises(QueryError):
            cache.query(_Identified(b"bad"), "CT1", refuse)
    assert len(calls) == 2  # a refusal is not kept
    long = b"x" * (CompiledQueries.LONGEST + 1)
    for _ in range(2):
        cache.query(_Identified(long), "CT1", _counting_compiler(calls))
    assert len(calls) == 4  # nor an identifier longer than LONGEST
    for n in range(CompiledQueries.QUERIES + 10):
        cache.query(_Identified(b"q%d" % n), "CT1", _counting_compiler(calls))
    assert len(cache.compiled) == CompiledQueries.QUERIES
    cache.query(_Identified(b"q0"), "CT1", _counting_compiler(calls))  # the oldest went first
    assert calls[-1] == (b"q0", "CT1")


def test_a_source_with_silent_connections_has_its_next_ones_refused_and_others_not():
    from bridge.net.cfind import SilentConnections

    now = [0.0]
    speaking: set[int] = set()  # connections with bytes waiting to be read
    silent = SilentConnections(forget_after=35.0, limit=3, silent_after=1.0, most=8,
                               has_data=lambda a: id(a) in speaking,
                               clock=lambda: now[0])  # fmt: skip

    def opened(assoc: object, host: str) -> int:
        return silent.opened(assoc, host)[0]

    burst = [object() for _ in range(5)]  # the associations (known by identity)
    assert [opened(a, "10.0.0.9") for a in burst] == [0] * 5  # none silent yet
    silent.requested(burst[0])  # spoke: no longer counted
    silent.closed(burst[1])  # closed: no longer counted
    now[0] = 1.5
    refused, why = silent.opened(object(), "10.0.0.9")  # three silent for over a second
    assert refused == 1 and "3 of its connections" in why and "at most 3" in why
    assert opened(object(), "10.0.0.9") == 2  # counted for the log line
    assert opened(object(), "10.0.0.7") == 0  # another source is not affected
    speaking.add(id(burst[2]))  # its request is there, not read yet: not silent
    assert opened(object(), "10.0.0.9") == 0  # two silent now: room again
    speaking.clear()
    silent.requested(burst[2])
    assert silent.closed(burst[3]) == 1.5  # how long it waited without a request
    assert silent.closed(burst[0]) is None  # it sent its request
    now[0] = 40.0  # past the ACSE timeout: the silent ones have been dropped by then
    late = [object() for _ in range(8)]
    assert [opened(a, f"10.1.0.{n}") for n, a in enumerate(late)] == [0] * 8
    assert set(silent.waiting) == {id(a) for a in late}
    refused, why = silent.opened(object(), "10.2.0.1")  # eight wait, from all sources
    assert refused == 1 and "all sources" in why and "at most 8" in why
    talker = object()
    speaking.add(id(talker))
    assert opened(talker, "10.2.0.1") == 0  # its request is waiting: taken all the same


def test_one_source_is_refused_past_max_associations_per_source(folder, caplog):
    """In-process: a third association from one address is refused A-ASSOCIATE-RJ and logged
    naming the setting; another address is still accepted."""
    ae = AE(ae_title="GREEDY")
    ae.add_requested_context(ModalityWorklistInformationFind)
    with bridge(folder, max_associations=10, max_associations_per_source=2) as port:
        held = [ae.associate("127.0.0.1", port, ae_title="WLBRIDGE") for _ in range(2)]
        try:
            assert all(assoc.is_established for assoc in held)
            assert refused(port, calling="GREEDY")
            other = ae.associate("127.0.0.1", port, ae_title="WLBRIDGE",
                                 bind_address=("127.0.0.2", 0))  # fmt: skip
            assert other.is_established
            other.release()
        finally:
            for assoc in held:
                assoc.release()
    lines = [r.getMessage() for r in caplog.records if "per-source" in r.getMessage()]
    assert lines and "GREEDY at 127.0.0.1" in lines[0], lines
