import json
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.ops.translation_log import (
    TerminalSafeFormatter,
    TranslationLog,
    format_logfmt,
    parse_logfmt,
    terminal_safe,
)


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


# What a terminal acts on: C0, DEL, C1 (CSI U+009B, NEL U+0085), line and paragraph separators,
# bidi overrides and isolates, zero-width characters, the BOM.
DANGEROUS = (
    [chr(c) for c in range(0x20)] + ["\x7f"] + [chr(c) for c in range(0x80, 0xA0)]
    + ["\u2028", "\u2029", "\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066",
       "\u2067", "\u2068", "\u2069", "\u200b", "\u200c", "\u200d", "\u200e", "\u200f",
       "\u2060", "\ufeff", "\u061c"]
)  # fmt: skip
values = st.text(
    alphabet=st.one_of(st.characters(), st.sampled_from(DANGEROUS + ["\\", '"', "=", " ", "x"])),
    max_size=60,
)


def assert_terminal_safe(line: str) -> None:
    bad = [c for c in line if c in DANGEROUS or not c.isprintable()]
    assert not bad, (line, bad)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "note", "reason", "peer"]), values, min_size=1))
def test_logfmt_reads_back_whatever_it_writes_and_writes_nothing_a_terminal_acts_on(record):
    record = {k: v for k, v in record.items() if v}
    line = format_logfmt(record)
    assert_terminal_safe(line)
    assert parse_logfmt(line) == record


def test_the_escape_of_a_character_beyond_latin_1_reads_back():
    record = {"note": "\u202eevil\u200b \U000e0041 \\x202e"}
    line = format_logfmt(record)
    assert "\\u202e" in line and "\\U000e0041" in line
    assert parse_logfmt(line) == record


@settings(max_examples=200, deadline=None)
@given(values)
def test_json_lines_escape_what_json_dumps_leaves_raw(tmp_path_factory, value):
    path = tmp_path_factory.mktemp("j") / "t.log"
    log = TranslationLog(path, "json")
    log.record(control_id=value or "x", note=value)
    log.close()
    text = path.read_text("utf-8")
    assert_terminal_safe(text.rstrip("\n"))
    assert json.loads(text)["control_id"] == (value or "x")


def test_the_stderr_formatter_escapes_every_module_message_and_uses_utc_z():
    formatter = TerminalSafeFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    record = logging.LogRecord(
        "bridge.net.cfind",
        logging.INFO,
        __file__,
        1,
        "C-FIND key %s",
        ("\x1b]0;pwned\x07\u202e\n",),
        None,
    )
    line = formatter.format(record)
    assert_terminal_safe(line)
    assert "\\x1b]0;pwned\\x07\\u202e\\x0a" in line
    stamp = line.split(" ")[0]
    assert stamp.endswith("Z") and "T" in stamp and len(stamp) == len("2026-12-01T21:00:00.000Z")
    assert terminal_safe("plain text") == "plain text"
