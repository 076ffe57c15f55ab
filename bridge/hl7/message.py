"""Step 2 of the pipeline: the bytes of one MLLP frame become an HL7 v2 message.

Decoding follows MSH-18 (the bytes are decoded with the charset the message declares), segments
may end in CR, LF or CRLF, and escape sequences are decoded when a value is read. This tokenizer
is the hot path's parser; what a message must look like for its version (segment order, required
fields, data types) comes from hl7apy's definitions in `hl7schema`.
"""

from __future__ import annotations

import codecs
import re
import string
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from bridge.hl7.errors import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    HL7Error,
)

if TYPE_CHECKING:
    from bridge.config import Settings

# MSH-18 value -> (Python codec, DICOM SpecificCharacterSet or "" for the default repertoire)
CHARSETS: dict[str, tuple[str, str]] = {
    "": ("ascii", ""),
    "ASCII": ("ascii", ""),
    "8859/1": ("latin-1", "ISO_IR 100"),
    "8859/2": ("iso8859-2", "ISO_IR 101"),
    "8859/3": ("iso8859-3", "ISO_IR 109"),
    "8859/4": ("iso8859-4", "ISO_IR 110"),
    "8859/5": ("iso8859-5", "ISO_IR 144"),
    "8859/6": ("iso8859-6", "ISO_IR 127"),
    "8859/7": ("iso8859-7", "ISO_IR 126"),
    "8859/8": ("iso8859-8", "ISO_IR 138"),
    "8859/9": ("iso8859-9", "ISO_IR 148"),
    "8859/15": ("iso8859-15", "ISO_IR 203"),
    "UNICODE UTF-8": ("utf-8", "ISO_IR 192"),
    "UNICODE": ("utf-8", "ISO_IR 192"),
    "UTF-8": ("utf-8", "ISO_IR 192"),
}
UTF8 = ("utf-8", "ISO_IR 192")
HL7_LABELS = frozenset(CHARSETS)  # HL7 table 0211's names: all that strict mode accepts
# What senders write in MSH-18 besides HL7's table 0211: DICOM's names of the same character sets
# (`ISO_IR 100`), and common spellings of the IANA names.
CHARSETS.update(
    {
        "ISO_IR 6": ("ascii", ""),
        "ISO 2022 IR 6": ("ascii", ""),
        "US-ASCII": ("ascii", ""),
        "ISO_IR 192": UTF8,
        "UTF8": UTF8,
        "GB18030": ("gb18030", "GB18030"),
        "GB 18030-2000": ("gb18030", "GB18030"),
        "GBK": ("gbk", "GBK"),
        "BIG-5": ("big5", "ISO_IR 192"),
        "KS X 1001": ("euc_kr", "ISO_IR 192"),
    }
)
for _label, (_codec, _dicom) in list(CHARSETS.items()):
    if _label.startswith("8859/"):
        part = _label[5:]
        CHARSETS.setdefault(_dicom, (_codec, _dicom))  # ISO_IR 100
        CHARSETS.setdefault(_dicom.replace("ISO_IR", "ISO 2022 IR"), (_codec, _dicom))
        CHARSETS.setdefault(f"ISO-8859-{part}", (_codec, _dicom))
        CHARSETS.setdefault(f"ISO8859-{part}", (_codec, _dicom))
        CHARSETS.setdefault(f"8859-{part}", (_codec, _dicom))
CHARSETS.setdefault("LATIN1", CHARSETS["8859/1"])
CHARSETS.setdefault("LATIN-1", CHARSETS["8859/1"])

_SEGMENT_END = re.compile(r"\r\n|\r|\n")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_C1_CONTROLS = re.compile("[\x80-\x9f]")


@dataclass(frozen=True)
class Delimiters:
    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


NULL = '""'  # HL7's explicit null value


class Segment:
    """One segment. Field numbers are HL7's: `PID-3` is `segment.raw(3)`; for MSH, MSH-1 is the
    field separator and MSH-2 the encoding characters, as the standard counts them."""

    __slots__ = ("name", "position", "occurrence", "_fields", "_delims", "_codec")

    def __init__(
        self,
        name: str,
        position: int,
        fields: list[str],
        delims: Delimiters,
        codec: str = "latin-1",
        occurrence: int = 1,
    ) -> None:
        self.name = name
        self.position = position  # 1-based place of the segment in the message
        # 1-based count of this segment ID so far: ERR-2.2 / ERR-1.2 (the 2nd OBR is OBR^2)
        self.occurrence = occurrence
        self._fields = fields  # _fields[0] is the segment name
        self._delims = delims
        self._codec = codec  # the message's charset, for \Xhh\ escapes

    def __repr__(self) -> str:
        return f"Segment({self.name}#{self.position})"

    @property
    def field_count(self) -> int:
        return len(self._fields) - 1 + (1 if self.name == "MSH" else 0)

    def raw(self, field: int) -> str:
        """The field's text as received, escapes and separators intact ("" when absent)."""
        if self.name == "MSH":
            if field == 1:
                return self._delims.field
            index = field - 1
        else:
            index = field
        if index < 1 or index >= len(self._fields):
            return ""
        return self._fields[index]

    def repetitions(self, field: int) -> list[str]:
        """Raw repetitions of a field (at least one, possibly empty)."""
        text = self.raw(field)
        if self.name == "MSH" and field in (1, 2):
            return [text]
        return text.split(self._delims.repetition)

    def value(
        self, field: int, component: int = 1, subcomponent: int = 1, repetition: int = 1
    ) -> str:
        """One leaf value, escapes decoded, "" when absent."""
        reps = self.repetitions(field)
        if repetition > len(reps):
            return ""
        return self.leaf(reps[repetition - 1], component, subcomponent)

    def components(self, field: int, repetition: int = 1) -> list[str]:
        """Every component of one repetition (first subcomponent of each), escapes decoded."""
        reps = self.repetitions(field)
        if repetition > len(reps):
            return []
        d = self._delims
        return [
            self.unescape(c.split(d.subcomponent)[0])
            for c in reps[repetition - 1].split(d.component)
        ]

    def leaf(self, repetition_text: str, component: int = 1, subcomponent: int = 1) -> str:
        d = self._delims
        comps = repetition_text.split(d.component)
        if component > len(comps):
            return ""
        subs = comps[component - 1].split(d.subcomponent)
        if subcomponent > len(subs):
            return ""
        return self.unescape(subs[subcomponent - 1])

    def unescape(self, text: str) -> str:
        if text == NULL:
            return ""  # HL7's explicit null: no value (the worklist has nothing to delete)
        return unescape(text, self._delims, self._codec)


def unescape(text: str, delims: Delimiters, codec: str = "latin-1") -> str:
    """Decode HL7 escape sequences (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\ \\.br\\); formatting
    escapes (\\H\\ \\N\\ ...) are dropped; an unknown or unterminated one is kept as written.
    Adjacent \\Xhh\\ escapes are decoded together: a UTF-8 character may span several."""
    esc = delims.escape
    if esc not in text:
        return text
    simple = {
        "F": delims.field,
        "S": delims.component,
        "T": delims.subcomponent,
        "R": delims.repetition,
        "E": delims.escape,
        ".br": "\r\n",
        "H": "",
        "N": "",
    }
    out: list[str] = []
    hex_run: list[tuple[bytes, str]] = []  # (bytes, escape as written) of adjacent \Xhh\

    def flush() -> None:
        if not hex_run:
            return
        try:
            out.append(b"".join(b for b, _ in hex_run).decode(codec))
        except UnicodeDecodeError:
            out.extend(written for _, written in hex_run)
        hex_run.clear()

    i, n = 0, len(text)
    while i < n:
        end = text.find(esc, i)
        if end < 0:
            flush()
            out.append(text[i:])
            break
        if end > i:
            flush()
            out.append(text[i:end])
            i = end
        close = text.find(esc, i + 1)
        if close < 0:
            flush()
            out.append(text[i:])
            break
        body = text[i + 1 : close]
        written = text[i : close + 1]
        data = _hex_bytes(body)
        if data is not None:
            hex_run.append((data, written))
        else:
            flush()
            out.append(simple.get(body, written))
        i = close + 1
    flush()
    return "".join(out)


def _hex_bytes(body: str) -> bytes | None:
    if body[:1] != "X" or len(body) < 3 or len(body) % 2 == 0:
        return None
    try:
        return bytes.fromhex(body[1:])
    except ValueError:
        return None


_ISO_DATE_TIME = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)(?:[T ](\d\d):(\d\d)(?::(\d\d)(?:[.,](\d+))?)?)?"
    r"(Z|[+-]\d\d:?\d\d)?"
)
_LONG_FRACTION = re.compile(r"(\d{14})\.(\d{4})\d+([+-]\d{4})?")


def loose_dtm(text: str) -> str | None:
    """What some senders write for an HL7 DTM, as one: ISO 8601 (`2017-04-25 07:31:13.123456`,
    `2021-06-21T08:15:00+02:00`) or more than 4 digits of fraction. None when it is neither."""
    text = text.strip()
    if m := _LONG_FRACTION.fullmatch(text):
        return f"{m.group(1)}.{m.group(2)}{m.group(3) or ''}"
    m = _ISO_DATE_TIME.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    dtm = year + month + day + (hour or "") + (minute or "") + (second or "")
    if fraction:
        dtm += "." + fraction[:4]
    if zone:
        dtm += "+0000" if zone == "Z" else zone.replace(":", "")
    return dtm


@dataclass
class MessageHeader:
    """What an ACK needs from MSH, read even from a message that cannot be parsed further."""

    delimiters: Delimiters
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    message_type: str = ""
    trigger_event: str = ""
    structure: str = ""
    control_id: str = ""
    processing_id: str = ""
    version: str = ""
    charset: str = ""  # MSH-18 as received (first repetition)
    charsets: tuple[str, ...] = ()  # every repetition of MSH-18 (ISO 2022 code extensions)


class HL7Message:
    """A decoded message: its segments, its header fields and the charset it declared."""

    def __init__(
        self,
        raw: bytes,
        text: str,
        segments: list[Segment],
        header: MessageHeader,
        codec: str,
        dicom_charset: str,
    ) -> None:
        self.raw = raw
        self.text = text
        self.segments = segments
        self.header = header
        self.codec = codec  # the Python codec the bytes were decoded with
        self.dicom_charset = dicom_charset  # SpecificCharacterSet for what this message carries
        self.notes: list[str] = []  # things worth a line in the translation log
        # the version whose rules apply (MSH-12 as read by hl7schema: "2.5.0" -> 2.5), once known
        self.rules_version: str = ""
        self._by_name: dict[str, list[Segment]] | None = None

    @property
    def delimiters(self) -> Delimiters:
        return self.header.delimiters

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def control_id(self) -> str:
        return self.header.control_id

    @property
    def version(self) -> str:
        """The HL7 version whose rules apply; MSH-12 as received is `header.version`."""
        return self.rules_version or self.header.version

    @property
    def message_type(self) -> str:
        """`ORM^O01` style: MSH-9.1 and MSH-9.2."""
        return f"{self.header.message_type}^{self.header.trigger_event}"

    def all(self, name: str) -> list[Segment]:
        # Grouped once: the mapping asks per order step, and a message may have thousands.
        if self._by_name is None:
            self._by_name = {}
            for segment in self.segments:
                self._by_name.setdefault(segment.name, []).append(segment)
        return list(self._by_name.get(name, ()))

    def first(self, name: str) -> Segment | None:
        found = self.all(name)
        return found[0] if found else None


_DELIMITER_CHARS = frozenset(string.punctuation)
# What framing and file tools leave around a message: MLLP bytes, NULs, a BOM, blank lines.
_LEADING_JUNK = b"\x00\x0b\x1c\r\n\t "
_TRAILING_JUNK = b"\x00\x0b\x1c\x1a\r\n"  # not spaces: they may end the last field
_BOM = b"\xef\xbb\xbf"


def _trim(raw: bytes) -> bytes:
    raw = raw.lstrip(_LEADING_JUNK)
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :].lstrip(_LEADING_JUNK)
    return raw.rstrip(_TRAILING_JUNK)


def _split_header_bytes(raw: bytes) -> tuple[Delimiters, list[bytes]]:
    if not raw.startswith(b"MSH") or len(raw) < 8:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "MSH^1", "the message does not start with MSH", "AR")
    sep = raw[3:4].decode("latin-1")
    if sep not in _DELIMITER_CHARS:
        raise HL7Error(DATA_TYPE_ERROR, "MSH^1^1", f"invalid field separator {sep!r}", "AR")
    ends = [i for i in (raw.find(b"\r"), raw.find(b"\n")) if i >= 0]
    line = raw[: min(ends)] if ends else raw  # MSH alone: no need to decode the whole message
    fields = line.split(sep.encode())
    enc = fields[1].decode("latin-1") if len(fields) > 1 else ""
    if (
        len(enc) < 4
        or len(set(enc[:4] + sep)) != 5
        or not all(c in _DELIMITER_CHARS for c in enc[:4])
    ):
        raise HL7Error(DATA_TYPE_ERROR, "MSH^1^2", f"invalid encoding characters {enc!r}", "AR")
    delims = Delimiters(sep, enc[0], enc[1], enc[2], enc[3])
    return delims, fields


def header_codec(charset: str) -> str:
    """The codec for MSH fields and the ACK: the declared charset's, or latin-1 when it is not one
    we know (latin-1 maps every byte, so what is echoed back is what was received)."""
    return CHARSETS.get(charset.strip().upper(), ("latin-1", ""))[0]


def _codec_of(name: str) -> tuple[str, str] | None:
    """(codec, DICOM charset) for an MSH-18 label or a Python codec name (`windows-1252`);
    text that is not in a DICOM charset is stored as UTF-8."""
    return CHARSETS.get(name.strip().upper()) or _loose_label(name)


def _squeezed(label: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", label.upper())


_SQUEEZED = {_squeezed(label): entry for label, entry in CHARSETS.items() if label}


def _loose_label(label: str) -> tuple[str, str] | None:
    """A label written another way (`ISO IR100`, `iso8859_1`, `UTF 8`), or the name of a text
    codec Python knows (`windows-1252`): (codec, DICOM charset), else None."""
    entry = _SQUEEZED.get(_squeezed(label))
    if entry is not None or not label.strip():
        return entry
    try:
        info = codecs.lookup(label.strip())
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None  # base64, zlib, rot13: codecs, not character sets
    return info.name, "ISO_IR 192"


def check_charset_settings(default_charset: str, fallback: dict[str, str]) -> None:
    """ValueError naming the setting when a charset setting names no known charset."""
    if _codec_of(default_charset) is None:
        raise ValueError(
            f"default_charset {default_charset!r} names no known charset "
            "(an MSH-18 label such as 8859/1 or ascii, or a charset such as windows-1252)"
        )
    for label, codec in fallback.items():
        if _codec_of(codec) is None:
            raise ValueError(f"charset_fallback: {label!r} = {codec!r} names no known charset")


# The last header read, by its trimmed bytes: the pipeline reads a message's header for its
# retry key, then parse_message reads it again. Headers are never changed once read.
_last_header: tuple[bytes, MessageHeader | None] = (b"", None)


def read_header(raw: bytes) -> MessageHeader | None:
    """MSH fields for an ACK, from bytes that may not parse; None when there is no usable MSH."""
    global _last_header
    raw = _trim(raw)
    last = _last_header
    if last[0] == raw and raw:
        return last[1]
    header = _read_header(raw)
    _last_header = (raw, header)
    return header


def _read_header(raw: bytes) -> MessageHeader | None:
    try:
        delims, fields = _split_header_bytes(raw)
    except HL7Error:
        return None

    def first(n: int) -> bytes:
        # MSH-n is fields[n - 1]: MSH-1 is the separator itself
        return fields[n - 1] if n - 1 < len(fields) else b""

    rep = delims.repetition.encode()
    comp = delims.component.encode()
    charsets = tuple(r.split(comp)[0].decode("latin-1").strip() for r in first(18).split(rep))
    charset = charsets[0]
    codec = header_codec(charset)

    def text(n: int) -> str:
        return first(n).decode(codec, errors="replace")

    def get(n: int, component: int = 1) -> str:
        comps = text(n).split(delims.repetition)[0].split(delims.component)
        value = comps[component - 1] if component <= len(comps) else ""
        return unescape(value.split(delims.subcomponent)[0], delims, codec).strip()

    return MessageHeader(
        delimiters=delims,
        sending_application=text(3),
        sending_facility=text(4),
        receiving_application=text(5),
        receiving_facility=text(6),
        message_type=get(9, 1),
        trigger_event=get(9, 2),
        structure=get(9, 3),
        control_id=get(10),
        processing_id=get(11),
        version=get(12),
        charset=charset,
        charsets=charsets if any(charsets) else (),
    )


def _decode(
    raw: bytes, header: MessageHeader, settings: Settings
) -> tuple[str, str, str, list[str]]:
    """Decode the bytes with the declared charset: (text, codec, dicom charset, notes).

    Outside strict mode what senders really do is read rather than refused, with a note: an
    empty MSH-18 over valid UTF-8 (read as UTF-8) or other 8-bit bytes (`default_charset`), a
    label we do not know over pure ASCII, and C1 or undecodable bytes that the label's
    `charset_fallback` reads."""
    strict = settings.strict
    label = header.charset
    shown = label or "ASCII"
    notes: list[str] = []
    entry = CHARSETS.get(label.upper()) if not strict or label.upper() in HL7_LABELS else None
    if entry is None and not strict and (entry := _loose_label(label)) is not None:
        notes.append(f"MSH-18 {label!r} is not an HL7 character set; read as {entry[0]}")
    if entry is None:
        if not strict and raw.isascii():
            notes.append(f"MSH-18 {label!r} is not a known character set; the bytes are ASCII")
            entry = CHARSETS[""]
        elif not strict and _is_utf8(raw):
            notes.append(f"MSH-18 {label!r} is not a known character set; the bytes are UTF-8")
            entry = UTF8
        else:
            raise HL7Error(
                TABLE_VALUE_NOT_FOUND, "MSH^1^18", f"unsupported character set {shown!r}"
            )
    if len(header.charsets) > 1 and b"\x1b" in raw:
        # MSH-18 repetitions name ISO 2022 code extensions, switched by ESC sequences.
        raise HL7Error(
            TABLE_VALUE_NOT_FOUND,
            "MSH^1^18^2",
            f"character set switching ({'~'.join(header.charsets)}) is not supported",
        )
    if not label and not strict and not raw.isascii():
        # HL7 says ASCII, but senders leave MSH-18 empty over their own charset.
        if _is_utf8(raw):
            return raw.decode("utf-8"), *UTF8, ["MSH-18 is empty; the bytes are UTF-8"]
        default = _codec_of(settings.default_charset) or CHARSETS[""]
        if default[0] != "ascii":
            shown = settings.default_charset
            entry = default
            notes.append(f"MSH-18 is empty; read as {shown} (default-charset)")
    codec, dicom = entry
    eight_bit = codec.startswith(("latin", "iso8859")) and not raw.isascii()
    if eight_bit:
        # UTF-8 under an 8859 label is common (the public dcm4che samples do it), and text that
        # is really 8859 and non-ASCII is almost never valid UTF-8: trust the bytes.
        if _is_utf8(raw):
            return raw.decode("utf-8"), *UTF8, [f"MSH-18 says {shown} but the bytes are UTF-8"]
    fallback = _fallback_of(settings, label or settings.default_charset)
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        if fallback is None:
            raise _charset_error(raw, exc.start, header, shown) from None
        text, codec, dicom = _decode_fallback(raw, fallback, header, shown, exc.start)
        notes.append(f"bytes that {shown} cannot decode read as {fallback} (charset-fallback)")
        c1 = None
    else:
        c1 = _C1_CONTROLS.search(text) if eight_bit else None
    if c1:
        # C1 bytes are never text in ISO 8859: guessing (Windows-1252?) would store garbage as
        # if it were the patient's data, unless the site says which charset its sender mixes in.
        if fallback is None:
            raise _charset_error(raw, c1.start(), header, shown)
        text, codec, dicom = _decode_fallback(raw, fallback, header, shown, c1.start())
        notes.append(f"bytes 0x80-0x9F under {shown} read as {fallback} (charset-fallback)")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise HL7Error(
            DATA_TYPE_ERROR,
            _location_of_offset(raw, nul, header.delimiters),
            "the message contains a NUL byte",
        )
    return text, codec, dicom, notes


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _fallback_of(settings: Settings, label: str) -> str | None:
    wanted = label.strip().upper()
    for key, value in settings.charset_fallback.items():
        if key.strip().upper() == wanted:
            return value
    return None


def _decode_fallback(
    raw: bytes, fallback: str, header: MessageHeader, shown: str, offset: int
) -> tuple[str, str, str]:
    codec, _ = _codec_of(fallback) or ("latin-1", "")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError:
        raise _charset_error(raw, offset, header, shown) from None
    # what the fallback reads (the euro sign, curly quotes) may be outside the label's DICOM
    # charset: the item is written in UTF-8 when it needs to be
    return text, codec, "ISO_IR 192"


def _charset_error(raw: bytes, offset: int, header: MessageHeader, label: str) -> HL7Error:
    return HL7Error(
        DATA_TYPE_ERROR,
        _location_of_offset(raw, offset, header.delimiters),
        f"byte 0x{raw[offset]:02X} does not fit the declared character set {label}",
    )


def _location_of_offset(raw: bytes, offset: int, delims: Delimiters) -> str:
    """ERR-2 location (SEG^occurrence^field) of a byte offset, for charset errors."""
    lines = _SEGMENT_END.split(raw[:offset].decode("latin-1"))
    name = lines[-1][:3]
    if not _SEGMENT_NAME.match(name) or delims.field not in lines[-1]:
        return ""  # the bad byte is in a segment name
    occurrence = sum(1 for line in lines if line[:3] == name)
    field = lines[-1].count(delims.field) + (1 if name == "MSH" else 0)
    return f"{name}^{occurrence}^{field}"


@cache
def _default_settings() -> Settings:
    from bridge.config import Settings

    return Settings()


def parse_message(raw: bytes, settings: Settings | None = None) -> HL7Message:
    """Tokenize one message. Raises HL7Error (and nothing else) for what makes it unreadable.
    `settings` decides how lenient the charset reading is (default settings when None)."""
    if settings is None:
        settings = _default_settings()
    raw = _trim(raw)
    header = read_header(raw)
    if header is None:
        _split_header_bytes(raw)  # raises the precise reason
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "MSH^1", "unreadable MSH segment", "AR")
    text, codec, dicom_charset, notes = _decode(raw, header, settings)
    delims = header.delimiters
    segments: list[Segment] = []
    seen: dict[str, int] = {}
    for line in _SEGMENT_END.split(text):
        if not line.strip():
            continue
        fields = line.split(delims.field)
        name = fields[0]
        if not _SEGMENT_NAME.match(name):
            location, hint = "", ""
            if segments:
                # Most often a bare CR or LF inside a field (a name on two lines): the field
                # where the previous segment ended is the one to fix.
                before = segments[-1]
                last = before.field_count
                location = f"{before.name}^{before.occurrence}^{last}"
                hint = f" (a line break inside {before.name}-{last}?)"
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                location,
                f"segment {len(segments) + 1} has an invalid name {name[:10]!r}{hint}",
            )
        seen[name] = seen.get(name, 0) + 1
        segments.append(Segment(name, len(segments) + 1, fields, delims, codec, seen[name]))
    if not header.control_id and settings.strict:
        raise HL7Error(REQUIRED_FIELD_MISSING, "MSH^1^10", "MSH-10 (message control ID) is empty")
    message = HL7Message(raw, text, segments, header, codec, dicom_charset)
    message.notes.extend(notes)
    return message
