import json

from bridge.translation_log import TranslationLog, format_logfmt, parse_logfmt


def test_logfmt_quotes_what_needs_quoting_and_reads_back():
    record = {"a": "plain", "b": "two words", "c": 'say "hi"', "d": "x=y", "e": "line\nbreak"}
    line = format_logfmt(record)
    assert "a=plain " in line
    assert 'b="two words"' in line
    assert "\n" not in line
    assert parse_logfmt(line) == record


def test_each_record_is_one_flushed_line_in_field_order(tmp_path):
    path = tmp_path / "logs" / "t.log"
    log = TranslationLog(path)
    log.record(outcome="created", control_id="MSG1", ack="AA", reason="")
    # readable before close: flushed at once, so `tail -f` follows it
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    fields = parse_logfmt(lines[0])
    assert list(fields) == ["time", "control_id", "outcome", "ack"]
    assert fields["control_id"] == "MSG1"
    assert fields["time"].endswith("Z")
    log.record(outcome="rejected", control_id="MSG2", ack="AE", reason="101 PID^1^3 missing")
    log.close()
    second = parse_logfmt(path.read_text().splitlines()[1])
    assert second["reason"] == "101 PID^1^3 missing"


def test_json_format(tmp_path):
    path = tmp_path / "t.log"
    log = TranslationLog(path, "json")
    log.record(control_id="Ü1", outcome="created", ack="AA")
    log.close()
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["control_id"] == "Ü1" and record["ack"] == "AA"
