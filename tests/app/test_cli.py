"""The command line: convert (no server), option parsing."""

from __future__ import annotations

import pydicom
import pytest

from bridge.app.cli import build_parser, main
from tests.conftest import SAMPLES


def test_convert_prints_items_and_the_ack_it_would_send(capsys):
    assert main(["convert", str(SAMPLES / "orm_o01_v231_nw.hl7")]) == 0
    out = capsys.readouterr().out
    assert "MSA|AA|" in out
    assert "Accession Number" in out
    assert "SCHEDULED" in out


def test_convert_with_output_writes_the_files(tmp_path, capsys):
    target = tmp_path / "wl"
    assert main(["convert", str(SAMPLES / "orm_o01_v251_nw.hl7"), "-o", str(target)]) == 0
    [path] = list(target.glob("*.wl"))
    assert pydicom.dcmread(path).AccessionNumber
    assert "outcome=created" in capsys.readouterr().out


def test_convert_reports_a_refused_message_with_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.hl7"
    text = (SAMPLES / "orm_o01_v251_nw.hl7").read_text("latin-1").replace("ORM^O01", "ORU^R01")
    bad.write_text(text, "latin-1")
    assert main(["convert", str(bad)]) == 1
    assert "MSA|AR|" in capsys.readouterr().out


def test_serve_options_are_parsed_and_unset_ones_stay_none():
    args = build_parser().parse_args(["serve", "--mllp-port", "3000", "--no-pn-case-insensitive"])
    assert args.mllp_port == 3000
    assert args.pn_case_insensitive is False
    assert args.dicom_port is None


def test_serve_refuses_a_bad_config(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("worklist-layout = 'nested'\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "worklist-layout" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "wlbridge" in capsys.readouterr().out
