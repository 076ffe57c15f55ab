"""A short reader of worklist files: Part 10 bytes straight to the compact record.

`pydicom.dcmread` followed by `record_from_dataset` costs ~1.2 ms a file, which made the first
start without the index cache take minutes at 100,000 items. `record_from_bytes` walks the
elements itself and builds the `Record` pydicom's path would build, value for value. It covers
Explicit and Implicit VR Little Endian, sequences and items of defined or undefined length, and
the single-byte and UTF-8 character sets; for anything else (other transfer syntaxes, ISO 2022
code extensions, a charset inside a sequence item, VRs such as UN, AT or OF, numbers pydicom would
reformat, private tags in implicit VR, elements out of order, lengths that do not add up, a
truncated file...) it returns None, and the caller reads the file with pydicom, which then
either succeeds or raises as it always did. tests/test_wlfile.py compares both paths.

Files come from other programs too, so `read_file_bytes` opens them non-blocking and reads only
regular files of a bounded size, and `incomplete` refuses a file whose lengths do not add up
(pydicom reads a truncated value as the shorter bytes it finds): no item is served in part.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import struct
from collections.abc import Callable
from sys import intern
from typing import Any

from pydicom import config
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR

from bridge.dicom.matching import _PLAIN_CODECS, Record, _norm_text, layout_of

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

_HEAD = struct.Struct("<HH2sH").unpack_from
_TAG_LEN = struct.Struct("<HHL").unpack_from
_LEN32 = struct.Struct("<L").unpack_from

# VRs read here. Explicit VR elements with a 4-byte length among them: OB, OW, SQ, UC, UR, UT.
_VRS = {
    vr.encode(): vr
    for vr in ("AE", "AS", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OW",
               "PN", "SH", "SL", "SQ", "SS", "ST", "TM", "UC", "UI", "UL", "UR", "US", "UT")
}  # fmt: skip
_LONG_VRS = frozenset({"OB", "OW", "SQ", "UC", "UR", "UT"})
_NUMBERS = {"US": ("H", 2), "SS": ("h", 2), "UL": ("L", 4), "SL": ("l", 4), "FL": ("f", 4),
            "FD": ("d", 8)}  # fmt: skip
_IS_RE = re.compile(r"[+-]?\d{1,12}")
_DS_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_SQ_UNDEFINED = 0xFFFFFFFF


class _Decline(Exception):
    """Something this reader does not reproduce exactly: pydicom reads the file."""


def _pydicom_defaults() -> bool:
    """The reader reproduces pydicom's default configuration only."""
    settings = config.settings
    return not (
        config.datetime_conversion or config.use_DS_decimal or config.use_DS_numpy
        or config.use_IS_numpy or config.use_none_as_empty_text_VR_value
        or settings.reading_validation_mode == config.RAISE
    )  # fmt: skip


def record_from_bytes(data: bytes) -> Record | None:
    """The record `record_from_dataset(dcmread(data, stop_before_pixels=True))` gives, or None
    when the file holds something left to pydicom."""
    if len(data) < 140 or data[128:132] != b"DICM" or not _pydicom_defaults():
        return None
    try:
        return _Reader(data).file()
    except (_Decline, struct.error, UnicodeError, ValueError, LookupError):
        return None


@functools.lru_cache(maxsize=64)
def _codec(raw: bytes) -> str:
    """The Python codec of a Specific Character Set value (as pydicom decodes with it)."""
    text = raw.decode("latin_1").rstrip(" \x00")
    if "\\" in text:
        raise _Decline("several character sets")
    codecs = convert_encodings(text)
    if len(codecs) != 1 or codecs[0] not in _PLAIN_CODECS:
        raise _Decline(f"character set {text!r}")
    return codecs[0]


@functools.lru_cache(maxsize=1024)
def _implicit_vr(tag: int) -> str | None:
    if tag >> 16 & 1:
        return None  # private: pydicom looks at the private creator
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UL" if tag & 0xFFFF == 0 else None
    return vr if vr in _VRS.values() else None


def _texts(parts: list[str], vr: str) -> Any:
    if len(parts) == 1:
        return _norm_text(parts[0], vr)
    return tuple(_norm_text(p, vr) for p in parts)


def _no_escape(raw: bytes) -> bytes:
    if b"\x1b" in raw:
        raise _Decline("code extension")
    return raw


# One function per VR: the stored value (bridge.dicom.matching._stored_value) of the value pydicom
# decodes from `raw` (not empty), in the character set `codec`.


def _text(raw: bytes, codec: str) -> Any:  # SH, LO, UC
    parts = _no_escape(raw).decode(codec).split("\\")
    if len(parts) == 1:
        return intern(parts[0].strip(" \x00"))
    return tuple(intern(p.strip(" \x00")) for p in parts)


def _code_string(raw: bytes, codec: str) -> Any:  # CS, DA, TM, AS, DT
    parts = raw.decode("latin_1").rstrip(" \x00").split("\\")
    if len(parts) == 1:
        return intern(parts[0].strip(" \x00"))
    return tuple(intern(p.strip(" \x00")) for p in parts)


def _ui(raw: bytes, codec: str) -> Any:
    return _texts(raw.decode("latin_1").rstrip("\x00 ").split("\\"), "UI")


def _pn(raw: bytes, codec: str) -> Any:
    names = []
    for name in _no_escape(raw).rstrip(b"\x00 ").decode(codec).split("\\"):
        if "=" in name:
            groups = name.split("=")
            while groups and not groups[-1]:
                groups.pop()
            name = "=".join(groups)
        names.append(name)
    return _texts(names, "PN")


def _ae(raw: bytes, codec: str) -> Any:
    return _texts([v.strip() for v in raw.decode("latin_1").split("\\")], "AE")


def _single_text(vr: str) -> Callable[[bytes, str], Any]:  # ST, LT, UT
    def read(raw: bytes, codec: str) -> Any:
        return _norm_text(_no_escape(raw).decode(codec).rstrip("\x00 "), vr)

    return read


def _number(fmt: str, size: int) -> Callable[[bytes, str], Any]:
    def read(raw: bytes, codec: str) -> Any:
        if len(raw) % size:
            raise _Decline("length of a binary number")
        values = struct.unpack(f"<{len(raw) // size}{fmt}", raw)
        return values[0] if len(values) == 1 else values

    return read


def _is(raw: bytes, codec: str) -> Any:
    parts = raw.decode("latin_1").rstrip(" \x00").split("\\")
    if not all(_IS_RE.fullmatch(p) for p in parts):
        raise _Decline("IS")
    return _texts(parts, "IS")


def _ds(raw: bytes, codec: str) -> Any:
    parts = raw.decode("latin_1").strip().rstrip(" \x00").split("\\")
    if not all(_DS_RE.fullmatch(p) and len(p) <= 16 for p in parts):
        raise _Decline("DS")
    return _texts(parts, "DS")


def _ur(raw: bytes, codec: str) -> Any:
    return _norm_text(raw.decode("latin_1").rstrip(), "UR")


def _bytes(raw: bytes, codec: str) -> Any:
    return raw


_CONVERTERS: dict[str, Callable[[bytes, str], Any]] = {
    **dict.fromkeys(("SH", "LO", "UC"), _text),
    **dict.fromkeys(("CS", "DA", "TM", "AS", "DT"), _code_string),
    **{vr: _single_text(vr) for vr in ("ST", "LT", "UT")},
    **{vr: _number(fmt, size) for vr, (fmt, size) in _NUMBERS.items()},
    "UI": _ui, "PN": _pn, "AE": _ae, "IS": _is, "DS": _ds, "UR": _ur, "OB": _bytes,
    "OW": _bytes,
}  # fmt: skip


class _Reader:
    __slots__ = ("data", "end", "implicit", "codec")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.end = len(data)
        self.implicit = False
        self.codec = "iso8859"

    def file(self) -> Record:
        data = self.data
        pos = 132
        if not _uppercase(data, pos + 4):
            raise _Decline("file meta not explicit VR")
        syntax = None
        while True:
            if pos + 8 > self.end:
                raise _Decline("no dataset after the file meta")
            group, elem, vr_bytes, length = _HEAD(data, pos)
            if group != 2:
                break
            vr = _VRS.get(vr_bytes)
            if vr is None:
                raise _Decline("file meta VR")
            if vr in _LONG_VRS:
                (length,) = _LEN32(data, pos + 8)
                pos += 12
            else:
                pos += 8
            if length == _SQ_UNDEFINED or pos + length > self.end:
                raise _Decline("file meta length")
            if elem == 0x0010:
                if vr != "UI":
                    raise _Decline("transfer syntax VR")
                syntax = data[pos : pos + length].decode("latin_1").rstrip("\x00 ")
            pos += length
        if syntax == IMPLICIT_LE:
            self.implicit = True
        elif syntax != EXPLICIT_LE:
            raise _Decline(f"transfer syntax {syntax!r}")
        if group == 0:
            raise _Decline("command set elements")
        # pydicom checks the first element's VR bytes against the transfer syntax
        if _uppercase(data, pos + 4) == self.implicit:
            raise _Decline("transfer syntax does not match the data")
        record, pos = self.dataset(pos, self.end, top=True)
        return record

    def dataset(self, pos: int, end: int | None, top: bool = False) -> tuple[Record, int]:
        """The elements from `pos` to `end` (None: up to an item delimitation item)."""
        data = self.data
        implicit = self.implicit
        keys: list[tuple[int, str]] = []
        values: list[Any] = []
        last = -1
        while True:
            if end is not None and pos >= end:
                if pos != end:
                    raise _Decline("element runs past its item")
                break
            if pos + 8 > self.end:
                raise _Decline("truncated")
            if implicit:
                group, elem, length = _TAG_LEN(data, pos)
                tag = group << 16 | elem
                vr = _implicit_vr(tag) if group != 0xFFFE else None
                pos += 8
            else:
                group, elem, vr_bytes, length = _HEAD(data, pos)
                tag = group << 16 | elem
                vr = _VRS.get(vr_bytes) if group != 0xFFFE else None
                if vr is not None and vr in _LONG_VRS:
                    (length,) = _LEN32(data, pos + 8)
                    pos += 12
                else:
                    pos += 8
            if tag == _ITEM_END and end is None and not top:
                return Record(layout_of(tuple(keys)), tuple(values)), pos
            if vr is None or tag <= last or group in (0, 2) or tag >= 0x7FE00000:
                raise _Decline(f"element ({group:04X},{elem:04X})")
            if tag < 0x00080005 and elem != 0:
                raise _Decline("element before the character set")
            last = tag
            if vr == "SQ":
                if tag == 0x00080005:
                    raise _Decline("character set VR")
                if length == _SQ_UNDEFINED:
                    value, pos = self.sequence(pos, None)
                else:
                    stop = pos + length
                    if stop > self.end:
                        raise _Decline("truncated")
                    value, pos = self.sequence(pos, stop)
            else:
                stop = pos + length
                if length == _SQ_UNDEFINED or stop > self.end:
                    raise _Decline("undefined length or truncated")
                raw = data[pos:stop]
                pos = stop
                if tag == 0x00080005:
                    if not top:
                        raise _Decline("character set inside an item")
                    if vr != "CS":
                        raise _Decline("character set VR")
                    self.codec = _codec(raw)
                value = _CONVERTERS[vr](raw, self.codec) if raw else ""
                if elem == 0:
                    continue  # group lengths: converted like pydicom, left out of records
            keys.append((tag, vr))
            values.append(value)
        if end is None:
            raise _Decline("item without its delimitation item")
        return Record(layout_of(tuple(keys)), tuple(values)), pos

    def sequence(self, pos: int, end: int | None) -> tuple[tuple[Record, ...], int]:
        data = self.data
        items = []
        while True:
            if end is not None and pos >= end:
                if pos != end:
                    raise _Decline("item runs past its sequence")
                break
            if pos + 8 > self.end:
                raise _Decline("truncated")
            group, elem, length = _TAG_LEN(data, pos)
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQ_END and end is None:
                return tuple(items), pos
            if tag != _ITEM:
                raise _Decline("not an item")
            if length == _SQ_UNDEFINED:
                if not self.implicit and not _item_is_explicit(data, pos):
                    raise _Decline("implicit VR item in an explicit VR sequence")
                record, pos = self.dataset(pos, None)
            else:
                stop = pos + length
                if stop > (self.end if end is None else end):
                    raise _Decline("item runs past its sequence")
                if length and not self.implicit and not _uppercase(data, pos + 4):
                    raise _Decline("implicit VR item in an explicit VR sequence")
                record, pos = self.dataset(pos, stop)
            items.append(record)
        if end is None:
            raise _Decline("sequence without its delimitation item")
        return tuple(items), pos


def _uppercase(data: bytes, pos: int) -> bool:
    """Whether the two bytes at `pos` look like an explicit VR (pydicom's test)."""
    return pos + 2 <= len(data) and 0x40 < data[pos] < 0x5B and 0x40 < data[pos + 1] < 0x5B


def _item_is_explicit(data: bytes, pos: int) -> bool:
    """An undefined-length item is read as explicit VR unless its first bytes look implicit;
    an empty one (its delimitation item first) reads the same either way."""
    if pos + 4 <= len(data) and _TAG_LEN(data, pos)[:2] == (0xFFFE, 0xE00D):
        return True
    return _uppercase(data, pos + 4)


# ---- Reading files other programs put in the folder: nothing about them is trusted.

MAX_FILE_SIZE = 16 * 1024 * 1024  # bytes; a worklist item is a few KiB
_UNDEFINED = 0xFFFFFFFF
_EXPLICIT_LONG = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
_DEFLATED_LE = "1.2.840.10008.1.2.1.99"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


class UnsafeFile(OSError):
    """A worklist file that is not read: not a regular file, too large, or incomplete."""


def read_file_bytes(path: str | os.PathLike, max_size: int = MAX_FILE_SIZE) -> tuple[bytes, Any]:
    """The bytes and stat of a regular file of at most `max_size` bytes. Opened non-blocking,
    so a FIFO or device named like an item never blocks the caller; checked after opening
    (fstat), so a rename between a check and the open cannot slip one in."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(f"not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_size:
            raise UnsafeFile(
                f"{st.st_size} bytes, more than the {max_size} a worklist file may have"
            )
        chunks, left = [], max_size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_size:  # grew while being read
            raise UnsafeFile(f"more than the {max_size} bytes a worklist file may have")
        return data, st
    finally:
        os.close(fd)


def read_dataset(path: str | os.PathLike, **dcmread_options: Any) -> Any:
    """A worklist file as a pydicom Dataset, read as read_file_bytes reads it and only if it
    parses completely (UnsafeFile otherwise)."""
    import io

    import pydicom

    data, _st = read_file_bytes(path)
    reason = incomplete(data)
    if reason is not None:
        raise UnsafeFile(f"does not parse completely: {reason}")
    return pydicom.dcmread(io.BytesIO(data), **dcmread_options)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):  # fmt: skip
        if test(mode):
            return name
    return "not a plain file"


def incomplete(data: bytes) -> str | None:
    """Why the Part 10 bytes `data` do not parse completely (a truncated copy, a file that is
    only a preamble), or None: every element's length fits, every sequence and item of
    undefined length is closed, and the dataset has at least one element. pydicom reads a
    truncated value as the shorter bytes it finds, so its reading alone does not tell."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return "no DICOM preamble"
    try:
        pos, syntax = _walk_meta(data)
        if syntax == _DEFLATED_LE:
            import zlib

            inflater = zlib.decompressobj(-zlib.MAX_WBITS)
            body = inflater.decompress(data[pos:], MAX_FILE_SIZE * 4)
            if not inflater.eof:
                return "deflated data set cut short"
            data, pos = body, 0
            syntax = EXPLICIT_LE
        if pos >= len(data):
            return "no data set after the file meta information"
        walker = _Walker(data, implicit=syntax == IMPLICIT_LE, big=syntax == _EXPLICIT_BE)
        walker.dataset(pos, len(data))
    except _Incomplete as exc:
        return str(exc)
    except Exception as exc:  # any failure to walk it is a reason not to serve it
        return f"unreadable structure ({type(exc).__name__})"
    return None


class _Incomplete(Exception):
    pass


def _walk_meta(data: bytes) -> tuple[int, str]:
    pos, end, syntax = 132, len(data), None
    while pos + 8 <= end:
        group, elem, vr, length = _HEAD(data, pos)
        if group != 2:
            break
        if vr in _EXPLICIT_LONG:
            if pos + 12 > end:
                raise _Incomplete("file meta information cut short")
            (length,) = _LEN32(data, pos + 8)
            pos += 12
        else:
            pos += 8
        if length == _UNDEFINED or pos + length > end:
            raise _Incomplete("file meta information cut short")
        if elem == 0x0010:
            syntax = data[pos : pos + length].decode("latin_1").rstrip("\x00 ")
        pos += length
    if syntax is None:
        raise _Incomplete("no transfer syntax in the file meta information")
    return pos, syntax


class _Walker:
    """Checks that element lengths add up, without converting any value."""

    def __init__(self, data: bytes, implicit: bool, big: bool) -> None:
        self.data = data
        self.implicit = implicit
        self.prefix = ">" if big else "<"

    def _tag_length(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, position of the value) of the element at pos."""
        data, p = self.data, self.prefix
        if pos + 8 > len(data):
            raise _Incomplete("cut short inside an element header")
        group, elem = struct.unpack_from(p + "HH", data, pos)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            (length,) = struct.unpack_from(p + "L", data, pos + 4)
            return tag, None, length, pos + 8
        vr = data[pos + 4 : pos + 6]
        if vr in _EXPLICIT_LONG:
            if pos + 12 > len(data):
                raise _Incomplete("cut short inside an element header")
            (length,) = struct.unpack_from(p + "L", data, pos + 8)
            return tag, vr, length, pos + 12
        (length,) = struct.unpack_from(p + "H", data, pos + 6)
        return tag, vr, length, pos + 8

    def dataset(self, pos: int, end: int | None) -> int:
        """Walk elements from pos to end (None: to an item delimitation item)."""
        while end is None or pos < end:
            tag, vr, length, pos = self._tag_length(pos)
            if tag == _ITEM_END:
                if end is None:
                    return pos
                raise _Incomplete("item delimitation outside an item")
            if length == _UNDEFINED:
                pos = self.sequence(pos, None)
                continue
            stop = pos + length
            limit = len(self.data) if end is None else end
            if stop > limit:
                raise _Incomplete(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) cut short")
            if vr == b"SQ":
                self.sequence(pos, stop)
            pos = stop
        if end is None:
            raise _Incomplete("item without its delimitation item")
        return pos

    def sequence(self, pos: int, end: int | None) -> int:
        while end is None or pos < end:
            tag, _vr, length, pos = self._tag_length(pos)
            if tag == _SEQ_END and end is None:
                return pos
            if tag != _ITEM:
                raise _Incomplete("a sequence holds something other than items")
            if length == _UNDEFINED:
                pos = self.dataset(pos, None)
                continue
            stop = pos + length
            if stop > (len(self.data) if end is None else end):
                raise _Incomplete("sequence item cut short")
            pos = self.dataset(pos, stop) if length else stop
        if end is None:
            raise _Incomplete("sequence without its delimitation item")
        return pos
