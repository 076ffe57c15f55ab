"""`wlbridge convert` answers what the server answers: every sample, hostile case and public feed
through a running server and through convert, with the same settings, compared."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from bridge.app.cli import main
from bridge.app.convert import Converter
from bridge.app.settings_checks import load_settings
from bridge.net.client import NoMessageError, read_messages, split_messages
from bridge.net.mllp import END, START, frame
from tests.conftest import ROOT, SAMPLES, RunningBridge, start_bridge
from tests.peers import SHARED_SAMPLES, require_public_samples

HOSTILE = ROOT / "tests" / "hostile"
CONFIG = SAMPLES / "wlbridge.toml"
# Differ by run, not by message: the instance UID's time part, the file's creation stamps.
VOLATILE = {"SOPInstanceUID", "InstanceCreationDate", "InstanceCreationTime"}


def corpus() -> list[Path]:
    files = sorted(SAMPLES.glob("*.hl7"))
    files += sorted(HOSTILE.glob("*.hl7")) + sorted(HOSTILE.glob("*.stream"))
    return files


def public_corpus() -> list[Path]:
    require_public_samples()
    return sorted((SHARED_SAMPLES / "dcm4che").glob("*.hl7")) + sorted(
        (SHARED_SAMPLES / "feeds").glob("*.hl7")
    )


def server_answers(port: int, data: bytes, expected: int) -> list[bytes]:
    """Send a file's bytes as a sender would (framed, unless the file holds MLLP frames or is a
    byte stream) on a fresh connection; up to `expected` answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(data if START in data else frame(data))
        buffer = b""
        while buffer.count(END) < expected:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                chunk = b""
            if not chunk:
                break
            buffer += chunk
    finally:
        sock.close()
    return [part[part.find(START) + 1 :] for part in buffer.split(END)[:-1]][:expected]


def essentials(ack: bytes) -> tuple[str, str, list[str]]:
    """MSA-1, MSA-3 and the ERR segments: what a sender acts on."""
    segments = re.split(rb"\r\n|\r|\n", ack)
    msa = next((s.decode("latin-1").split("|") for s in segments if s.startswith(b"MSA")), [])
    errs = [s.decode("latin-1") for s in segments if s.startswith(b"ERR")]
    return (msa[1] if len(msa) > 1 else "", msa[3] if len(msa) > 3 else "", errs)


def item_values(path: Path) -> dict[str, str]:
    dataset = pydicom.dcmread(path)
    return {e.keyword: str(e.value) for e in dataset.iterall() if e.keyword not in VOLATILE}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[RunningBridge]:
    running = start_bridge(tmp_path_factory.mktemp("parity"), "--config", str(CONFIG))
    yield running
    assert running.stop() == 0, "".join(running.stderr_lines)


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> Iterator[Converter]:
    settings = load_settings(CONFIG, {"ae_title": "WLBRIDGE"})
    with Converter(settings, tmp_path_factory.mktemp("converted")) as conv:
        yield conv


def compare(path: Path, served: RunningBridge, converter: Converter) -> None:
    data = path.read_bytes()
    try:
        messages = [m for _, m in read_messages([path])]
    except NoMessageError:
        # Nothing the tools would send: convert refuses the file (see the CLI tests).
        assert not split_messages(data)
        return
    acks = server_answers(served.mllp_port, data, len(messages))
    reports = [converter.convert(m) for m in messages]
    if not acks and len(messages) == 1:
        # Bytes without a readable MSH may be answered by closing the connection; convert
        # then has nothing to echo either.
        assert b"MSA|AR||" in reports[0].ack or b"MSA|AR|\r" in reports[0].ack, reports[0].text
        return
    assert [essentials(a) for a in acks] == [essentials(r.ack) for r in reports], path.name
    records = served.log_records()[-len(messages) :]
    for record, report in zip(records, reports, strict=True):
        assert record.get("outcome") == report.record.get("outcome"), path.name
        assert record.get("file", "") == report.record.get("file", ""), path.name
        for name in filter(None, record.get("file", "").split(",")):
            served_file = next(served.worklist_dir.rglob(name), None)
            converted = next(converter.settings.worklist_dir.rglob(name), None)
            assert (served_file is None) == (converted is None), name
            if served_file is not None:
                assert item_values(served_file) == item_values(converted), name


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_convert_and_the_server_answer_each_sample_alike(served, converter, path):
    compare(path, served, converter)


def test_convert_and_the_server_answer_each_public_sample_alike(served, converter):
    files = public_corpus()
    assert len(files) >= 40
    for path in files:
        compare(path, served, converter)


def test_a_21_character_accession_is_ae_102_in_convert_as_in_the_server(tmp_path, capsys):
    text = (SAMPLES / "orm_o01_v251_nw.hl7").read_text("latin-1")
    assert "|UMC25-70113|" in text  # OBR-18, the accession number
    long = tmp_path / "long.hl7"
    long.write_text(text.replace("|UMC25-70113|", "|" + "A" * 21 + "|"), "latin-1")
    assert main(["convert", str(long)]) == 1
    out = capsys.readouterr().out
    assert "MSA|AE|" in out and "102" in out


def test_convert_never_names_a_folder_it_removed(tmp_path, capsys):
    bad = tmp_path / "bad.hl7"
    bad.write_bytes((HOSTILE / "date-not-a-date.hl7").read_bytes())
    assert main(["convert", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "outcome=rejected" in out
    assert "kept_as" not in out and "wlbridge-convert-" not in out


def test_convert_with_output_applies_messages_in_order(tmp_path, capsys):
    target = tmp_path / "wl"
    nw, ca = SAMPLES / "orm_o01_v251_nw.hl7", SAMPLES / "orm_o01_v251_ca.hl7"
    assert main(["convert", str(nw), "-o", str(target)]) == 0
    assert len(list(target.glob("*.wl"))) == 1
    assert main(["convert", str(ca), "-o", str(target)]) == 0
    assert "outcome=removed" in capsys.readouterr().out
    assert list(target.glob("*.wl")) == []


def test_convert_takes_the_settings_of_serve(tmp_path, capsys):
    # A station rule of the config decides the station, as in the server.
    config = tmp_path / "c.toml"
    config.write_text('[[station-rules]]\nmatch = {}\nae-titles = ["ROOM7"]\n')
    assert main(["convert", str(SAMPLES / "orm_o01_v251_nw.hl7"), "--config", str(config)]) == 0
    assert "ROOM7" in capsys.readouterr().out
    assert main(["convert", str(SAMPLES / "orm_o01_v251_nw.hl7"), "--overlong-values", "x"]) == 2
    assert "overlong-values" in capsys.readouterr().err


def test_a_file_with_a_bom_is_converted_as_the_server_takes_it(tmp_path, capsys):
    body = (SAMPLES / "orm_o01_v251_nw.hl7").read_bytes().replace(b"\r\n", b"\r")
    bom = tmp_path / "bom.hl7"
    bom.write_bytes(b"\xef\xbb\xbf" + body.replace(b"\r", b"\r\n"))
    assert main(["convert", str(bom)]) == 0
    assert "MSA|AA|" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"\r\n\t \r\n", b"\x0bMSH|^~\\&|A|B|C|D|"])
def test_a_file_without_a_message_is_an_error(tmp_path, capsys, content):
    empty = tmp_path / "nothing.hl7"
    empty.write_bytes(content)
    assert main(["convert", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "nothing.hl7" in err and "no HL7 message" in err
