"""The tokenizer: delimiters, escapes, segment endings, charsets, junk, and that arbitrary bytes
only ever raise HL7Error."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.app.settings_checks import load_settings
from bridge.config import Settings
from bridge.hl7.errors import HL7Error
from bridge.hl7.message import Delimiters, parse_message, read_header, unescape
from tests.peers import require_public_samples

MSH = "MSH|^~\\&|RIS|HOSP|WLB|RAD|20240102||ORM^O01^ORM_O01|CTRL1|P|2.5.1"


def build(*segments: str, charset: str = "", sep: str = "\r") -> str:
    msh = MSH + ("|" * 6 + charset if charset else "")
    return sep.join([msh, *segments])


STRICT = Settings(strict=True)


def error_of(raw: bytes, config: Settings | None = None) -> HL7Error:
    with pytest.raises(HL7Error) as info:
        parse_message(raw, config)
    return info.value


# --- structure of the text ------------------------------------------------------------------


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_segment_endings(sep):
    m = parse_message(build("PID|||123||DOE^JOHN", "PV1||O", sep=sep).encode())
    assert [s.name for s in m.segments] == ["MSH", "PID", "PV1"]
    assert m.first("PID").value(5, 2) == "JOHN"


def test_header_fields_and_msh_numbering():
    m = parse_message(build("PID|||1").encode())
    assert m.msh.raw(1) == "|" and m.msh.raw(2) == "^~\\&" and m.msh.value(9, 3) == "ORM_O01"
    h = m.header
    assert (h.message_type, h.trigger_event, h.structure, h.control_id) == (
        "ORM",
        "O01",
        "ORM_O01",
        "CTRL1",
    )
    assert (h.processing_id, h.version) == ("P", "2.5.1")


def test_occurrence_counts_segments_of_one_name():
    m = parse_message(build("PID|||1", "ORC|NW", "OBR|1", "ORC|NW", "OBR|2").encode())
    assert [(s.name, s.position, s.occurrence) for s in m.all("OBR")] == [
        ("OBR", 4, 1),
        ("OBR", 6, 2),
    ]


def test_repetitions_components_subcomponents():
    m = parse_message(build("PID|||1^^^A&1.2&ISO~2^^^B||DOE^JOHN").encode())
    pid = m.first("PID")
    assert pid.repetitions(3) == ["1^^^A&1.2&ISO", "2^^^B"]
    assert pid.value(3, 4, 2) == "1.2"
    assert pid.value(3, 1, repetition=2) == "2"
    assert pid.value(3, 1, repetition=3) == ""
    assert pid.components(5) == ["DOE", "JOHN"]
    assert pid.value(99) == ""


def test_other_delimiters():
    raw = "MSH#:*!@#RIS#H#W#R#2024##ORM:O01#ID1#P#2.5.1\rPID###1:::A*2#"
    m = parse_message(raw.encode())
    assert m.delimiters == Delimiters("#", ":", "*", "!", "@")
    assert m.first("PID").repetitions(3) == ["1:::A", "2"]


@pytest.mark.parametrize(
    "junk_before, junk_after",
    [(b"\x0b", b"\x1c\r"), (b"\r\n\r\n", b"\n\n"), (b"\xef\xbb\xbf", b""), (b"\x00\x00", b"\x00")],
)
def test_framing_leftovers_around_the_message(junk_before, junk_after):
    m = parse_message(junk_before + build("PID|||1").encode() + junk_after)
    assert [s.name for s in m.segments] == ["MSH", "PID"]


@pytest.mark.parametrize(
    ("raw", "code", "location"),
    [
        (b"", "100", "MSH^1"),
        (b"junk MSH|^~\\&|", "100", "MSH^1"),
        (b"MSHA^~\\&|x", "102", "MSH^1^1"),
        (b"MSH|^~|x|y", "102", "MSH^1^2"),
        (b"MSH|^^\\&|x|y", "102", "MSH^1^2"),
    ],
)
def test_unreadable_messages(raw, code, location):
    err = error_of(raw)
    assert (err.code, err.location) == (code, location)


def test_invalid_segment_name():
    err = error_of(build("PID|||1", "pv1||O").encode())
    assert err.code == "100" and "segment 3" in err.text


def test_very_long_field_is_fast_and_intact():
    big = "A" * 1_000_000
    start = time.perf_counter()
    m = parse_message(build(f"OBX|1|TX|||{big}").encode())
    assert time.perf_counter() - start < 0.5
    assert m.first("OBX").value(5) == big


# --- escapes --------------------------------------------------------------------------------

D = Delimiters()


@pytest.mark.parametrize(
    ("text", "codec", "expected"),
    [
        ("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", "latin-1", "a|b^c&d~e\\f"),
        ("\\X41\\\\X42\\", "latin-1", "AB"),
        ("M\\XFC\\ller", "latin-1", "Müller"),
        ("M\\XC3BC\\ller", "utf-8", "Müller"),
        ("M\\XC3\\\\XBC\\ller", "utf-8", "Müller"),  # one character over two escapes
        ("\\XC3\\", "utf-8", "\\XC3\\"),  # half a character: kept as written
        ("\\XZZ\\ \\X4\\ \\Q\\", "latin-1", "\\XZZ\\ \\X4\\ \\Q\\"),
        ("line\\.br\\two", "latin-1", "line\r\ntwo"),
        ("\\H\\bold\\N\\", "latin-1", "bold"),
        ("open \\F", "latin-1", "open \\F"),
    ],
)
def test_unescape(text, codec, expected):
    assert unescape(text, D, codec) == expected


def test_value_unescapes_with_the_message_charset():
    raw = build("PID|||1||M\\XC3\\\\XBC\\ller", charset="UNICODE UTF-8").encode()
    assert parse_message(raw).first("PID").value(5) == "Müller"


def hl7_escape(text: str) -> str:
    table = {"\\": "\\E\\", "|": "\\F\\", "^": "\\S\\", "&": "\\T\\", "~": "\\R\\"}
    return "".join(table.get(c, c) for c in text)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50))
def test_escape_round_trip(text):
    assert unescape(hl7_escape(text), D, "utf-8") == text


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20))
def test_hex_escape_round_trip_utf8(text):
    hexed = "".join(f"\\X{b:02X}\\" for b in text.encode())
    assert unescape(hexed, D, "utf-8") == text


# --- charsets -------------------------------------------------------------------------------


def test_utf8_declared_and_valid():
    m = parse_message(build("PID|||1||Žižka^日本", charset="UNICODE UTF-8").encode())
    assert m.first("PID").value(5, 2) == "日本" and m.dicom_charset == "ISO_IR 192"
    assert m.notes == []


def test_utf8_declared_with_invalid_bytes_is_102_at_its_field():
    raw = build("PID|||1||DOE", "PV1||O||||||\xff", charset="UNICODE UTF-8").encode("latin-1")
    err = error_of(raw)
    assert (err.code, err.ack_code, err.location) == ("102", "AE", "PV1^1^8")


def test_empty_msh10_is_a_note_and_101_in_strict_mode():
    raw = b"MSH|^~\\&|a|b|c|d|||ORM^O01||P|2.5.1"
    assert parse_message(raw).control_id == ""
    err = error_of(raw, STRICT)
    assert (err.code, err.location) == ("101", "MSH^1^10")


def test_ascii_declared_with_8bit_bytes_is_102_in_strict_mode_and_for_ascii_default():
    raw = build("PID|||1||M\xfcller").encode("latin-1")
    for config in (STRICT, Settings(default_charset="ascii")):
        err = error_of(raw, config)
        assert (err.code, err.location) == ("102", "PID^1^5")
        assert "ASCII" in err.text


def test_empty_msh18_with_8bit_bytes_is_read_as_the_default_charset():
    raw = build("PID|||1||M\xfcller^Ren\xe9").encode("latin-1")
    m = parse_message(raw)
    assert m.first("PID").value(5) == "Müller" and m.dicom_charset == "ISO_IR 100"
    assert m.notes == ["MSH-18 is empty; read as 8859/1 (default-charset)"]
    m = parse_message(raw, Settings(default_charset="8859/2"))
    assert m.first("PID").value(5, 2) == "René" and m.codec == "iso8859-2"


@pytest.mark.parametrize("default", ["8859/1", "ascii", "8859/15"])
def test_empty_msh18_with_valid_utf8_is_utf8_whatever_the_default(default):
    m = parse_message(build("PID|||1||Müller^Zoë").encode(), Settings(default_charset=default))
    assert m.first("PID").value(5) == "Müller" and m.dicom_charset == "ISO_IR 192"
    assert m.notes == ["MSH-18 is empty; the bytes are UTF-8"]
    # the standard to the letter: ASCII
    err = error_of(build("PID|||1||Müller").encode(), STRICT)
    assert (err.code, err.location) == ("102", "PID^1^5")


@pytest.mark.parametrize(
    ("label", "dicom"),
    [("ISO_IR 100", "ISO_IR 100"), ("ISO_IR 192", "ISO_IR 192"), ("ISO 2022 IR 100", "ISO_IR 100"),
     ("ISO-8859-1", "ISO_IR 100"), ("ISO_IR 148", "ISO_IR 148"), ("ISO_IR 6", "")],
)  # fmt: skip
def test_dicom_and_iana_names_of_charsets_are_accepted(label, dicom):
    text = "Müller" if dicom != "" else "Muller"
    codec = "utf-8" if dicom == "ISO_IR 192" else "latin-1"
    m = parse_message(build(f"PID|||1||{text}", charset=label).encode(codec))
    assert m.first("PID").value(5) == text and m.dicom_charset == dicom and m.notes == []


def test_unknown_label_on_ascii_is_a_note():
    m = parse_message(build("PID|||1||DOE", charset="encoding").encode())
    assert m.first("PID").value(5) == "DOE"
    assert m.notes == ["MSH-18 'encoding' is not a known character set; the bytes are ASCII"]
    m = parse_message(build("PID|||1||Müller", charset="encoding").encode())
    assert m.first("PID").value(5) == "Müller" and m.dicom_charset == "ISO_IR 192"


def test_charset_fallback_reads_c1_bytes():
    raw = build("PID|||1||M\xfcller \x80", charset="8859/1").encode("latin-1")
    assert error_of(raw).code == "102"  # C1 controls are never 8859 text
    m = parse_message(raw, Settings(charset_fallback={"8859/1": "windows-1252"}))
    assert m.first("PID").value(5) == "Müller €" and m.dicom_charset == "ISO_IR 192"
    assert "charset-fallback" in m.notes[0]
    # an empty MSH-18 falls back by the default charset's label
    raw = build("PID|||1||M\xfcller \x93x\x94").encode("latin-1")
    m = parse_message(raw, Settings(charset_fallback={"8859/1": "cp1252"}))
    assert m.first("PID").value(5) == "Müller “x”"


def test_charset_settings_are_checked_when_loaded(tmp_path):
    config = tmp_path / "wlbridge.toml"
    config.write_text('default-charset = "klingon"\n')
    with pytest.raises(ValueError, match="default_charset 'klingon'"):
        load_settings(config)
    config.write_text('[charset-fallback]\n"8859/1" = "nonsense-42"\n')
    with pytest.raises(ValueError, match="charset_fallback"):
        load_settings(config)
    config.write_text('charset-fallback = "windows-1252"\n')
    with pytest.raises(ValueError, match=r"\[charset-fallback\] must be a table"):
        load_settings(config)
    config.write_text('[charset-fallback]\n"8859/1" = "windows-1252"\n')
    assert load_settings(config).charset_fallback == {"8859/1": "windows-1252"}


def test_latin1_declared_and_latin1_bytes():
    m = parse_message(build("PID|||1||Müller", charset="8859/1").encode("latin-1"))
    assert m.first("PID").value(5) == "Müller" and m.dicom_charset == "ISO_IR 100"
    assert m.notes == []


@pytest.mark.parametrize("name", ["Müller", "José", "Ŀ–x"])
def test_utf8_bytes_under_an_8859_label_are_read_as_utf8(name):
    m = parse_message(build(f"PID|||1||{name}", charset="8859/1").encode())
    assert m.first("PID").value(5) == name
    assert m.dicom_charset == "ISO_IR 192"
    assert m.notes == ["MSH-18 says 8859/1 but the bytes are UTF-8"]


@pytest.mark.parametrize("charset", ["8859/1", "8859/2"])
def test_c1_bytes_that_are_not_utf8_do_not_fit_an_8859_label(charset):
    err = error_of(build("PID|||1||A\x96B", charset=charset).encode("latin-1"))
    assert (err.code, err.location) == ("102", "PID^1^5")


def test_unknown_charset_is_103():
    err = error_of(build("PID|||1", charset="EBCDIC").encode(), STRICT)
    assert (err.code, err.location) == ("103", "MSH^1^18")
    # nor ASCII nor UTF-8: nothing says how to read the bytes
    err = error_of(build("PID|||1||M\xfcller", charset="EBCDIC").encode("latin-1"))
    assert (err.code, err.location) == ("103", "MSH^1^18")


def test_msh18_repetitions():
    m = parse_message(build("PID|||1||Müller", charset="8859/1~ISO IR87").encode("latin-1"))
    assert m.header.charset == "8859/1" and m.header.charsets == ("8859/1", "ISO IR87")
    assert m.first("PID").value(5) == "Müller"
    err = error_of(build("PID|||1||\x1b$B", charset="8859/1~ISO IR87").encode("latin-1"))
    assert (err.code, err.location) == ("103", "MSH^1^18^2")


def test_nul_byte_is_102_at_its_field():
    err = error_of(build("PID|||1", "PV1||O|a\x00b|x").encode())
    assert (err.code, err.location) == ("102", "PV1^1^3")


def test_read_header_decodes_fields_with_the_declared_charset():
    raw = build("PID|||1", charset="UNICODE UTF-8").replace("RIS", "RÖNTGEN").encode()
    assert read_header(raw).sending_application == "RÖNTGEN"


# --- properties -----------------------------------------------------------------------------

HEADERS = [b"", b"MSH|^~\\&|", MSH.encode(), (MSH + "||||||UNICODE UTF-8").encode()]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(HEADERS), st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_hl7error(head, tail):
    for raw in (head + tail, head + b"\r" + tail, tail):
        try:
            m = parse_message(raw)
        except HL7Error as exc:
            assert exc.ack_code in ("AE", "AR") and exc.code.isdigit()
            continue
        assert m.segments[0].name == "MSH"
        for seg in m.segments:  # every accessor works on whatever was accepted
            for f in range(0, 8):
                seg.value(f, 2, 2, 2)
                seg.components(f)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=20),
        max_size=6,
    )
)
def test_field_values_round_trip_through_escaping(values):
    pid = "PID|" + "|".join(hl7_escape(v) for v in values)
    m = parse_message(build(pid, charset="UNICODE UTF-8").encode())
    for i, v in enumerate(values, start=1):
        assert m.first("PID").value(i) == v


# --- the public samples and speed -----------------------------------------------------------


def test_public_samples_parse():
    folder = require_public_samples()
    for path in sorted(folder.glob("*.hl7")):
        m = parse_message(path.read_bytes())
        assert m.segments[0].name == "MSH" and m.control_id, path.name
        assert "\r" not in "".join(s.raw(3) for s in m.segments)


def test_tokenizer_speed():
    raw = build(
        "PID|||583295^^^ADT1||DOE^J1|||M||WH||||||||20983295",
        "PV1||E||||||5101^NELL^FREDERICK^P^^DR|||||||||||V103-1^^^ADT1",
        "ORC|NW|A103Z^MESA_ORDPLC|B103Z^MESA_ORDFIL||SC||1^once^^^^S||200007010900",
        "OBR|1|A103Z^MESA_ORDPLC|B103Z^MESA_ORDFIL|P1^Procedure 1^ERL_MESA^X1_A1^SP^DSS"
        "|||||||||xxx||Radiology^^^^R|7101^ESTRADA^JAIME^P^^DR||MOF5|RP5|SPS5||||MR",
        "ZDS|1.113654.3.13.1026^100^Application^DICOM",
        "NTE|1||Patient is claustrophobic: open MR preferred; contrast allergy (iodine), "
        "creatinine 0.9 mg/dL on 20000630, transport by wheelchair",
    ).encode()
    assert 550 <= len(raw) <= 700
    n = 2000
    best = min(_timed(raw, n) for _ in range(3))
    assert best < 0.1e-3 * 3, f"{best * 1e3:.3f} ms per message"  # 3x margin for loaded CI


def _timed(raw: bytes, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        parse_message(raw)
    return (time.perf_counter() - start) / n


def test_explicit_null_reads_as_empty():
    m = parse_message(build('PID|||1||""^JANE||""|F|||""^^SPRINGFIELD').encode())
    pid = m.first("PID")
    assert pid.components(5) == ["", "JANE"]
    assert pid.value(7) == ""
    assert pid.components(11) == ["", "", "SPRINGFIELD"]


def test_a_line_break_inside_a_field_is_refused_at_that_field():
    raw = build("PID|1|604|||Tierschutzverein Bernburg und \rUmgebung E.V.^Tyson||20200101|M")
    err = error_of(raw.encode())
    assert (err.code, err.location) == ("100", "PID^1^5")
    assert "line break inside PID-5" in err.text


@pytest.mark.parametrize(
    ("label", "codec"),
    [("ISO IR100", "latin-1"), ("iso8859_1", "latin-1"), ("windows-1252", "cp1252"),
     ("UTF 8", "utf-8")],
)  # fmt: skip
def test_charset_labels_written_another_way_are_read_with_a_note(label, codec):
    m = parse_message(build("PID|||1||Müller€", charset=label).encode("cp1252")
                      if codec == "cp1252" else
                      build("PID|||1||Müller", charset=label).encode(codec))  # fmt: skip
    assert m.first("PID").value(5).startswith("Müller") and m.codec == codec
    assert any("is not an HL7 character set" in n for n in m.notes)
    assert error_of(build("PID|||1", charset=label).encode(), STRICT).code == "103"


def test_headers_read_one_after_the_other_are_each_their_own():
    # read_header keeps the last header it read: another message must never get it
    first = b"MSH|^~\\&|A|B|C|D|20260101||ORM^O01|ONE|P|2.5.1\rPID|1"
    second = b"MSH|^~\\&|A|B|C|D|20260101||ORM^O01|TWO|P|2.5.1\rPID|1"
    for raw, control in ((first, "ONE"), (second, "TWO"), (first, "ONE"), (first, "ONE")):
        assert read_header(raw).control_id == control
        assert parse_message(raw).header.control_id == control
    assert read_header(b"") is None and read_header(b"not HL7") is None
    assert read_header(first).control_id == "ONE"
