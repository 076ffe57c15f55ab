"""Searching the translation log backwards, its subscriber hook, and the C-FIND line."""

from __future__ import annotations

import threading
from pathlib import Path

from bridge.http.logsearch import BLOCK, LogQuery, histories, search_log
from bridge.ops.translation_log import TranslationLog, parse_logfmt, query_recorder


def write_log(path: Path, n: int, fmt: str = "logfmt") -> None:
    log = TranslationLog(path, fmt)
    for i in range(n):
        # lengths vary so that lines straddle the block boundaries
        log.record(control_id=f"C{i}", type="ORM^O01", accession=f"A{i % 50}",
                   patient_id=f"P{i % 7}", outcome="created", ack="AA",
                   note="x" * (i % 300))  # fmt: skip
    log.close()


def test_newest_first_and_stops_at_the_limit_without_reading_the_whole_file(tmp_path):
    path = tmp_path / "t.log"
    write_log(path, 20000)
    result = search_log(path, LogQuery(limit=3))
    assert [r["control_id"] for r in result.records] == ["C19999", "C19998", "C19997"]
    assert result.scanned_bytes <= BLOCK < path.stat().st_size
    by_accession = search_log(path, LogQuery(accession="A7", limit=5)).records
    assert [r["control_id"] for r in by_accession] == [
        f"C{i}" for i in (19957, 19907, 19857, 19807, 19757)
    ]


def test_every_line_is_found_across_block_boundaries(tmp_path):
    path = tmp_path / "t.log"
    write_log(path, 3000)
    assert path.stat().st_size > 5 * BLOCK
    result = search_log(path, LogQuery(limit=1000, patient_id="P3"))
    expected = [f"C{i}" for i in reversed(range(3000)) if i % 7 == 3][:1000]
    assert [r["control_id"] for r in result.records] == expected
    assert result.complete


def test_the_work_is_bounded_and_says_so(tmp_path):
    path = tmp_path / "t.log"
    write_log(path, 5000)
    result = search_log(path, LogQuery(control_id="C0"), max_bytes=2 * BLOCK)
    assert result.records == [] and not result.complete
    assert result.scanned_bytes == 2 * BLOCK
    assert search_log(path, LogQuery(control_id="C0")).records[0]["control_id"] == "C0"


def test_since_stops_the_scan_and_until_skips_newer_lines(tmp_path):
    path = tmp_path / "t.log"
    lines = [
        f"time=2026-12-0{d}T10:00:00.000Z control_id=D{d} type=ORM^O01 outcome=created ack=AA"
        for d in range(1, 6)
    ]
    path.write_text("\n".join(lines) + "\n")
    got = search_log(path, LogQuery(since="2026-12-03", until="2026-12-04")).records
    assert [r["control_id"] for r in got] == ["D4", "D3"]


def test_json_lines_and_damaged_lines(tmp_path):
    path = tmp_path / "t.log"
    write_log(path, 10, fmt="json")
    with open(path, "a") as f:
        f.write("{not json\n\x00\x01 garbage\n")
    got = search_log(path, LogQuery(accession="A3")).records
    assert [r["control_id"] for r in got] == ["C3"]


def test_histories_of_several_items_in_one_scan(tmp_path):
    path = tmp_path / "t.log"
    log = TranslationLog(path)
    log.record(control_id="M1", accession="ACC1", file="one.wl", outcome="created")
    log.record(control_id="M2", accession="ACC1,ACC2", file="one.wl,two.wl", outcome="created")
    log.record(type="api", file="two.wl", outcome="removed", by="admin")
    log.close()
    got = histories(path, [("ACC1", "one.wl"), ("ACC2", "two.wl"), ("", "three.wl")])
    assert [r.get("control_id") for r in got[("ACC1", "one.wl")]] == ["M2", "M1"]
    assert [r.get("outcome") for r in got[("ACC2", "two.wl")]] == ["removed", "created"]
    assert got[("", "three.wl")] == []


def test_subscribers_get_every_record_from_every_thread_and_lines_stay_whole(tmp_path):
    path = tmp_path / "t.log"
    log = TranslationLog(path)
    seen: list[dict] = []
    lock = threading.Lock()

    def keep(record: dict) -> None:
        with lock:
            seen.append(record)

    def broken(record: dict) -> None:
        raise RuntimeError("a subscriber bug")

    log.subscribe(broken)  # must not cost the others their records, nor the line
    log.subscribe(keep)

    def writer(n: int) -> None:
        for i in range(200):
            log.record(control_id=f"T{n}-{i}", note="y" * 500)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 800 == len(seen)
    assert all(parse_logfmt(line)["note"] == "y" * 500 for line in lines)


def test_the_cfind_line_says_who_asked_what_and_got_what(tmp_path):
    path = tmp_path / "t.log"
    log = TranslationLog(path)
    record = query_recorder(log)
    record(calling="CT1", called="WLBRIDGE", keys="AccessionNumber=A1 Modality=CT", answers=1,
           matched=1, outcome="success", ms=2.345)  # fmt: skip
    record(calling="CT1", called="WLBRIDGE", keys="-", answers=0, matched=0,
           outcome="refused (bad date)", ms=0.5)  # fmt: skip
    record(calling="MR1", called="WLBRIDGE", keys="(universal)", answers=10, matched=40,
           outcome="truncated at max_answers=10", ms=9)  # fmt: skip
    log.close()
    lines = [parse_logfmt(line) for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "C-FIND" and lines[0]["accession"] == "A1"
    assert (lines[0]["calling_ae"], lines[0]["answers"], lines[0]["status"]) == ("CT1", "1", "0000")
    assert lines[0]["ms"] == "2.3" and lines[0]["keys"] == "AccessionNumber=A1 Modality=CT"
    assert (lines[1]["outcome"], lines[1]["status"]) == ("refused", "A900")
    assert lines[1]["note"] == "refused (bad date)"
    assert (lines[2]["outcome"], lines[2]["status"], lines[2]["matched"]) == (
        "truncated",
        "A700",
        "40",
    )


def test_text_is_matched_without_case_and_quoted_values_are_found(tmp_path):
    path = tmp_path / "t.log"
    log = TranslationLog(path)
    log.record(control_id="Q1", patient_id="VAN DIJK 7", outcome="created", note="Lefèvre")
    log.record(control_id="Q2", patient_id="P2", outcome="rejected", reason='bad "date"')
    log.close()
    assert [r["control_id"] for r in search_log(path, LogQuery(text="lefÈvre")).records] == ["Q1"]
    assert search_log(path, LogQuery(patient_id="VAN DIJK 7")).records[0]["control_id"] == "Q1"
    assert search_log(path, LogQuery(outcome="rejected")).records[0]["control_id"] == "Q2"
    assert search_log(path, LogQuery(text='"date"')).records[0]["control_id"] == "Q2"
