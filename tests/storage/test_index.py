"""The worklist index: loading, the bridge's own updates, changes by other programs, the cache."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from twisted.internet.threads import blockingCallFromThread

from bench.worklist_items import generate, make_item, write_item
from bench.worklist_items import query as q
from bridge.config import Settings
from bridge.dicom.matching import compile_query
from bridge.storage.index import CACHE_NAME, WorklistIndex

WAIT = 5.0  # seconds a change may take to be seen (the requirement is 1 s; CI machines lag)


def make_index(folder: Path, **settings) -> WorklistIndex:
    index = WorklistIndex(Settings(worklist_dir=folder, **settings))
    index.load()
    return index


@pytest.fixture
def watched(tmp_path, reactor):
    """An index of a folder holding 20 items, watching it from the reactor thread."""
    generate(tmp_path, 20)
    index = make_index(tmp_path, index_poll_interval=0.2)
    blockingCallFromThread(reactor, index.start_watching, reactor)
    yield index
    blockingCallFromThread(reactor, index.stop_watching)


def accessions(records) -> list[str]:
    return [r.get(0x00080050) for r in records]


def age(folder: Path, seconds: float = 60) -> None:
    """Date every file back, as files written long before a restart would be."""
    past = time.time() - seconds
    for f in folder.rglob("*.wl"):
        os.utime(f, (past, past))


def other_program_writes(path: Path, ds: Dataset) -> None:
    """Another process writes a file: temporary name, then rename, like a careful writer."""
    tmp = path.with_name("." + path.name + ".part")
    write_item(tmp, ds)
    subprocess.run([sys.executable, "-c", f"import os; os.rename({str(tmp)!r}, {str(path)!r})"],
                   check=True)  # fmt: skip


def test_load_and_search_with_secondary_indexes(tmp_path):
    generate(tmp_path, 40)  # 8 modalities, station <modality>1, patients of two items
    (tmp_path / "notes.txt").write_text("not a worklist file")
    (tmp_path / ".hidden.wl").write_bytes(b"temporary")
    index = make_index(tmp_path)
    assert len(index) == 40
    found = index.search(compile_query(q(PatientID="P0000003")))
    assert accessions(found) == ["A0000006", "A0000007"]
    keys = {"ScheduledStationAETitle": "MR1", "ScheduledProcedureStepStartDate": "20240105"}
    found = index.search(compile_query(q(sps=keys)))
    assert accessions(found) == ["A0000001"]
    found = index.search(compile_query(q(sps={"ScheduledProcedureStepStartDate": "20240107-"})))
    assert len(found) == 24 and all(r.get(0x00400100)[0].get(0x00400002) >= "20240107"
                                    for r in found)  # fmt: skip


def test_selective_queries_touch_only_candidates(tmp_path):
    generate(tmp_path, 400)
    index = make_index(tmp_path)
    calls = 0

    def counting(query):
        inner = query.matches

        def matches(rec):
            nonlocal calls
            calls += 1
            return inner(rec)

        query.matches = matches
        return query

    for keys, answers in [
        (q(PatientID="P0000100"), 2),
        (q(AccessionNumber="A0000399"), 1),
        (q(sps={"ScheduledStationAETitle": "CT1", "ScheduledProcedureStepStartDate": "20240105"}),
         5),
        (q(sps={"ScheduledProcedureStepStartDate": "20240105-20240106"}), 80),
    ]:  # fmt: skip
        calls = 0
        assert len(index.search(counting(compile_query(keys)))) == answers
        assert calls <= answers * 10, keys  # candidates, not the 400 items


def test_put_and_discard_are_seen_at_once(tmp_path):
    index = make_index(tmp_path)
    path = tmp_path / "new.wl"
    ds = make_item("NEW", patient_id="PX")
    write_item(path, ds)
    before = index.generation
    index.put(path, ds)
    assert index.generation > before
    assert accessions(index.search(compile_query(q(PatientID="PX")))) == ["NEW"]
    ds.AccessionNumber = "NEW2"
    index.put(path, ds)  # replaced, not added
    assert accessions(index.search(compile_query(q(PatientID="PX")))) == ["NEW2"]
    assert len(index) == 1
    os.unlink(path)
    index.discard(path)
    assert index.search(compile_query(q(PatientID="PX"))) == []
    assert index.search(compile_query(q(AccessionNumber="NEW2"))) == []


def test_items_of_patient_and_get(tmp_path):
    for i, issuer in enumerate(["HOSP", "OTHER"]):
        write_item(
            tmp_path / f"i{i}.wl", make_item(f"A{i}", patient_id="P1", IssuerOfPatientID=issuer)
        )
    write_item(tmp_path / "i9.wl", make_item("A9", patient_id="P2"))
    index = make_index(tmp_path)
    items = index.items_of_patient("P1")
    assert sorted(ds.AccessionNumber for _p, ds in items) == ["A0", "A1"]
    assert [p.name for p, _ds in index.items_of_patient("P1", "OTHER")] == ["i1.wl"]
    assert index.get(tmp_path / "i9.wl").AccessionNumber == "A9"
    assert index.get(tmp_path / "absent.wl") is None


def test_files_written_by_another_program_are_picked_up(watched):
    folder = Path(watched.root)
    path = folder / "added.wl"
    other_program_writes(path, make_item("ADDED", patient_id="PADD"))
    assert watched.wait_until(lambda: watched.record(path) is not None, WAIT)
    other_program_writes(path, make_item("CHANGED", patient_id="PADD"))
    assert watched.wait_until(
        lambda: accessions(watched.search(compile_query(q(PatientID="PADD")))) == ["CHANGED"], WAIT
    )
    victim = folder / "item0000003.wl"
    subprocess.run(["rm", str(victim)], check=True)
    assert watched.wait_until(lambda: watched.record(victim) is None, WAIT)
    assert len(watched) == 20  # 20 - 1 removed + 1 added


def test_changes_are_seen_within_a_second(watched):
    path = Path(watched.root) / "fast.wl"
    started = time.monotonic()
    other_program_writes(path, make_item("FAST"))
    assert watched.wait_until(lambda: watched.record(path) is not None, WAIT)
    assert time.monotonic() - started < 1.0


def test_polling_fallback_without_inotify(tmp_path, reactor, monkeypatch):
    def no_inotify(self, reactor):
        raise OSError("inotify not available here")

    monkeypatch.setattr(WorklistIndex, "_start_inotify", no_inotify)
    index = make_index(tmp_path, index_poll_interval=0.1)
    blockingCallFromThread(reactor, index.start_watching, reactor)
    try:
        assert index._notifier is None
        path = tmp_path / "polled.wl"
        other_program_writes(path, make_item("POLLED"))
        assert index.wait_until(lambda: index.record(path) is not None, WAIT)
        path.unlink()
        assert index.wait_until(lambda: index.record(path) is None, WAIT)
    finally:
        blockingCallFromThread(reactor, index.stop_watching)


def test_restart_reads_only_changed_files_from_the_cache(tmp_path):
    generate(tmp_path, 30)
    age(tmp_path)
    first = make_index(tmp_path)
    assert first.load_stats["read"] == 30
    assert (tmp_path / CACHE_NAME).is_file()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    # Change one file keeping its size, remove one, add one.
    changed = tmp_path / "item0000005.wl"
    data = changed.read_bytes()
    changed.write_bytes(data.replace(b"A0000005", b"B0000005"))
    assert changed.stat().st_size == len(data)
    (tmp_path / "item0000006.wl").unlink()
    write_item(tmp_path / "extra.wl", make_item("EXTRA"))
    second = make_index(tmp_path)
    assert second.load_stats == {**second.load_stats, "items": 30, "read": 2, "cached": 28}
    assert accessions(second.search(compile_query(q(PatientID="P0000002")))) == [
        "A0000004", "B0000005"]  # fmt: skip
    assert second.record(tmp_path / "item0000006.wl") is None


def test_a_foreign_cache_is_not_trusted(tmp_path, caplog):
    generate(tmp_path, 3)
    age(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / CACHE_NAME).write_bytes(pickle.dumps({"version": 1, "entries": Evil()}))
    with caplog.at_level(logging.WARNING):
        index = make_index(tmp_path)
    assert len(index) == 3 and index.load_stats["read"] == 3
    assert not (tmp_path / "pwned").exists()
    assert "ignoring index cache" in caplog.text


def test_items_missing_required_attributes_are_served_and_named_once(tmp_path, caplog, reactor):
    bad = tmp_path / "bad.wl"
    write_item(bad, make_item("BAD", PatientBirthDate=None, sps_ScheduledStationAETitle=""))
    with caplog.at_level(logging.WARNING, logger="bridge.storage.index"):
        index = make_index(tmp_path)
        ds = pydicom.dcmread(bad)
        index.put(bad, ds)  # the same item again: no second warning
    assert accessions(index.search(compile_query(q(AccessionNumber="BAD")))) == ["BAD"]
    warnings = [r.getMessage() for r in caplog.records if "lacks required" in r.getMessage()]
    assert len(warnings) == 1
    assert str(bad) in warnings[0]
    assert "PatientBirthDate" in warnings[0] and "ScheduledStationAETitle" in warnings[0]


def test_unreadable_files_are_logged_once_and_skipped(tmp_path, caplog, reactor):
    generate(tmp_path, 2)
    broken = tmp_path / "broken.wl"
    broken.write_bytes(b"this is not DICOM at all" * 10)
    with caplog.at_level(logging.WARNING, logger="bridge.storage.index"):
        index = make_index(tmp_path, index_poll_interval=0.1)
        assert len(index) == 2
        # Rescans must not log it again while it is unchanged.
        blockingCallFromThread(reactor, index.start_watching, reactor)
        try:
            generation = index.generation
            write_item(tmp_path / "later.wl", make_item("LATER"))
            assert index.wait_until(lambda: index.generation > generation, WAIT)
            blockingCallFromThread(reactor, index._poll)
            assert index.wait_until(lambda: not index._polling, WAIT)
        finally:
            blockingCallFromThread(reactor, index.stop_watching)
    unreadable = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(unreadable) == 1 and str(broken) in unreadable[0].getMessage()


def test_per_ae_layout_keeps_items_apart(tmp_path, reactor):
    for ae in ("CTSCANNER", "MRSCANNER"):
        generate(tmp_path / ae, 3, prefix=ae.lower())
    write_item(tmp_path / "stray.wl", make_item("STRAY"))  # not in an AE folder: not served
    index = make_index(tmp_path, worklist_layout="per-ae")
    assert index.ae_folders() == {"CTSCANNER", "MRSCANNER"}
    assert len(index) == 6
    everything = compile_query(q(AccessionNumber=""))
    assert len(index.search(everything, folder="CTSCANNER")) == 3
    assert index.search(everything, folder="NOSUCH") == []
    # A folder created later is watched too.
    blockingCallFromThread(reactor, index.start_watching, reactor)
    try:
        (tmp_path / "USSCANNER").mkdir()
        path = tmp_path / "USSCANNER" / "us.wl"
        other_program_writes(path, make_item("US1"))
        assert index.wait_until(lambda: len(index.search(everything, folder="USSCANNER")) == 1,
                                WAIT)  # fmt: skip
    finally:
        blockingCallFromThread(reactor, index.stop_watching)


def test_a_large_first_load_reads_in_processes_with_the_same_outcome(tmp_path, caplog, monkeypatch):
    generate(tmp_path, 60)
    write_item(tmp_path / "utf8.wl", make_item("UTF8", patient_name="Dvořák^Antonín",
                                               charset="ISO_IR 192"))  # fmt: skip
    good = (tmp_path / "item0000001.wl").read_bytes()
    (tmp_path / "truncated.wl").write_bytes(good[:700])
    (tmp_path / "garbage.wl").write_bytes(b"not DICOM" * 50)
    age(tmp_path)
    one = make_index(tmp_path)
    (tmp_path / CACHE_NAME).unlink()
    monkeypatch.setattr("bridge.storage.index.PARALLEL_MIN_FILES", 10)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bridge.storage.index"):
        pooled = make_index(tmp_path)
    assert pooled.load_stats["workers"] >= 2 and one.load_stats["workers"] == 0
    assert len(pooled) == len(one) == 61  # a cut copy is served by neither path
    for key in one._entries:
        assert repr(pooled.record(key)) == repr(one.record(key))
    assert accessions(pooled.search(compile_query(q(PatientName="DVOŘÁK*")))) == ["UTF8"]
    unreadable = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(unreadable) == 2  # named once each, by the pooled load
    assert {"garbage.wl", "truncated.wl"} == {
        m.split(": ")[0].rsplit("/", 1)[1] for m in unreadable
    }


def test_the_cache_can_be_written_after_the_load(tmp_path):
    generate(tmp_path, 3)
    age(tmp_path)  # recent files are left out of the cache: they may still change
    index = WorklistIndex(Settings(worklist_dir=tmp_path))
    index.load(save_cache=False)
    assert index.cache_is_stale and not (tmp_path / CACHE_NAME).exists()
    index.save_cache()
    assert (tmp_path / CACHE_NAME).is_file() and not index.cache_is_stale
    again = make_index(tmp_path)
    assert (again.load_stats["cached"], again.load_stats["read"]) == (3, 0)


def test_start_up_names_the_file_it_waits_on(caplog):
    from bridge.storage.index import _SlowReadReporter

    log = logging.getLogger("bridge.storage.index")
    with caplog.at_level(logging.WARNING, logger="bridge.storage.index"):
        with _SlowReadReporter(log, after=0.2) as reporter:
            reporter.reading("/folder/stalled.wl")
            deadline = time.monotonic() + 20
            while not caplog.records and time.monotonic() < deadline:
                time.sleep(0.05)
    assert caplog.records, "nothing logged while waiting"
    assert "start-up is waiting on /folder/stalled.wl" in caplog.records[0].getMessage()


def test_sync_now_applies_what_another_process_renamed_in_before_the_call(tmp_path, reactor):
    """A DICOM worker's index: inotify's events wait for sync_now(), which applies every one
    queued before it on the calling thread (read-your-writes without a hand-over)."""
    generate(tmp_path, 5)
    index = make_index(tmp_path)
    index.refresh_inline = True
    blockingCallFromThread(reactor, index.start_watching, reactor, False)
    try:
        path = tmp_path / "renamed.wl"
        other_program_writes(path, make_item("SYNCED", patient_id="PSYNC"))
        (tmp_path / "item0000001.wl").unlink()
        assert index.record(path) is None  # nothing read the events yet: no reactor reading
        index.sync_now()
        assert accessions(index.search(compile_query(q(PatientID="PSYNC")))) == ["SYNCED"]
        assert index.record(tmp_path / "item0000001.wl") is None
        assert len(index) == 5
    finally:
        blockingCallFromThread(reactor, index.stop_watching)
