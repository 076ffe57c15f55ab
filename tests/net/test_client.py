import subprocess
import sys

import pytest

from bridge.net.client import ack_summary, split_messages
from tests.conftest import ROOT, SAMPLES, start_bridge
from tests.messages import orm


def test_split_plain_text_files_on_msh_and_normalise_line_ends():
    data = b"MSH|^~\\&|A|B\nPID|1\r\nOBR|1\n\nMSH|^~\\&|C|D\rPID|2\r"
    assert split_messages(data) == [b"MSH|^~\\&|A|B\rPID|1\rOBR|1\r", b"MSH|^~\\&|C|D\rPID|2\r"]


def test_split_mllp_framed_files():
    data = b"\x0bMSH|1\rPID|1\x1c\r\x0bMSH|2\x1c\r"
    assert split_messages(data) == [b"MSH|1\rPID|1", b"MSH|2"]


def test_split_drops_a_bom_before_each_msh_as_the_listener_does():
    data = b"\xef\xbb\xbfMSH|^~\\&|A\r\nPID|1\r\n\xef\xbb\xbfMSH|^~\\&|B\r\n"
    assert split_messages(data) == [b"MSH|^~\\&|A\rPID|1\r", b"MSH|^~\\&|B\r"]


def test_split_keeps_text_before_the_first_msh_with_it():
    # The listener would take this file as one message (and refuse it): so do the tools.
    assert split_messages(b"PID|1\rMSH|^~\\&|A\rORC|NW\r") == [b"PID|1\rMSH|^~\\&|A\rORC|NW\r"]
    assert split_messages(b"garbage") == [b"garbage\r"]
    assert split_messages(b" \r\n\x00\t") == []


def test_split_frames_as_the_listener_does():
    # Noise outside frames is discarded, a frame cut by a new start block and one that never
    # ends are dropped.
    data = b"noise\x0bMSH|1\x0bMSH|2\x1c\rjunk\x0bMSH|3\x1c\r\x0bMSH|4"
    assert split_messages(data) == [b"MSH|2", b"MSH|3"]


def test_read_messages_refuses_a_file_without_one(tmp_path):
    from bridge.net.client import NoMessageError, read_messages

    (tmp_path / "cut.hl7").write_bytes(b"\x0bMSH|^~\\&|A")
    with pytest.raises(NoMessageError, match="cut.hl7.*no complete MLLP frame"):
        read_messages([tmp_path / "cut.hl7"])


def test_ack_summary_reads_msa_and_err():
    ack = b"MSH|^~\\&|X|Y\rMSA|AE|C1|bad\rERR||ORC^1^7|102^Data type error^HL70357|E"
    code, control, detail = ack_summary(ack)
    assert (code, control) == ("AE", "C1")
    assert "102" in detail


def test_answer_rows_show_names_whole_and_multiple_values_joined():
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    from bridge.net.client import answer_rows

    answer = Dataset()
    answer.PatientName = "MÜLLER^Jürgen"
    answer.PatientID = "P1"
    step = Dataset()
    step.ScheduledStationAETitle = ["CT1", "CT2"]
    answer.ScheduledProcedureStepSequence = Sequence([step])
    [row] = answer_rows([answer])
    assert row[0] == "MÜLLER^Jürgen" and row[1] == "P1"
    assert "CT1\\CT2" in row


# The commands against a running server


def wlbridge(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "bridge", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_send_prints_the_ack_text_and_err_of_a_refusal(bridge, tmp_path):
    long = tmp_path / "long.hl7"
    long.write_text(orm(control_id="LONG-1", accession="A" * 21), "latin-1")
    result = wlbridge("send", "--port", str(bridge.mllp_port), str(long))
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("long.hl7: AE LONG-1")
    assert "ERR " in line and "102" in line
    assert "  " in line.split("LONG-1", 1)[1]  # MSA-3's text follows the control ID


def test_send_takes_a_file_with_a_bom_as_the_server_does(bridge, tmp_path):
    bom = tmp_path / "bom.hl7"
    body = orm(control_id="BOM-1", accession="ACCBOM1").replace("\r", "\r\n")
    bom.write_bytes(b"\xef\xbb\xbf" + body.encode("latin-1"))
    result = wlbridge("send", "--port", str(bridge.mllp_port), str(bom))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bom.hl7: AA BOM-1" in result.stdout


def test_send_refuses_a_file_without_a_message(bridge, tmp_path):
    empty = tmp_path / "blank.hl7"
    empty.write_text("\r\n  \r\n")
    result = wlbridge("send", "--port", str(bridge.mllp_port), str(empty))
    assert result.returncode == 2
    assert "blank.hl7" in result.stderr and "no HL7 message" in result.stderr


def test_query_shows_the_status_column(bridge):
    assert wlbridge("send", "--port", str(bridge.mllp_port), str(SAMPLES / "orm_o01_v251_nw.hl7"))
    result = wlbridge("query", "--port", str(bridge.dicom_port))
    assert result.returncode == 0, result.stderr
    header, _, row, *_ = result.stdout.splitlines()
    assert header.split()[-1] == "status"
    assert row.split()[-1] == "SCHEDULED"


def test_all_stations_lists_every_station_when_own_items_only_is_on(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[[station-rules]]\nmatch = { "OBR-24" = "CT" }\nae-titles = ["CT01"]\n'
        '[[station-rules]]\nmatch = { "OBR-24" = "MR" }\nae-titles = ["MR01"]\n'
    )
    running = start_bridge(tmp_path, "--config", str(config), "--own-items-only")
    try:
        for n, modality in enumerate(("CT", "MR")):
            order = tmp_path / f"{modality}.hl7"
            order.write_text(orm(control_id=f"ST-{n}", accession=f"ACCST{n}", sps_id=f"S{n}",
                                 requested_procedure_id=f"R{n}", modality=modality))  # fmt: skip
            assert wlbridge("send", "--port", str(running.mllp_port), str(order)).returncode == 0
        port = str(running.dicom_port)
        own = wlbridge("query", "--port", port, "--calling-aet", "ADMIN")
        assert "0 item(s)" in own.stdout, own.stdout + own.stderr
        every = wlbridge("query", "--port", port, "--calling-aet", "ADMIN", "--all-stations",
                         "--config", str(config))  # fmt: skip
        assert every.returncode == 0, every.stderr
        assert "2 item(s)" in every.stdout and "CT01" in every.stdout and "MR01" in every.stdout
    finally:
        assert running.stop() == 0


@pytest.fixture(scope="module")
def dicom_tls_bridge(tmp_path_factory):
    from tests.net.test_tls import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    running = start_bridge(tmp_path_factory.mktemp("tls"), "--dicom-tls-cert",
                           str(pki.server_cert), "--dicom-tls-key", str(pki.server_key),
                           "--dicom-tls-ca", str(pki.ca))  # fmt: skip
    yield running, pki
    assert running.stop() == 0, "".join(running.stderr_lines)


def test_query_over_tls_with_a_client_certificate(dicom_tls_bridge):
    running, pki = dicom_tls_bridge
    [line] = [line for line in running.stderr_lines if "wlbridge serving" in line]
    assert "DICOM WLBRIDGE" in line and "TLS, client certificate required" in line
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert)]
    result = wlbridge(
        "query", "--port", str(running.dicom_port), *tls, "--tls-key", str(pki.client_key)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final status 0x0000" in result.stdout


def test_a_tls_failure_says_tls_not_the_ae_title(dicom_tls_bridge):
    running, pki = dicom_tls_bridge
    result = wlbridge("query", "--port", str(running.dicom_port), "--tls-ca", str(pki.ca))
    assert result.returncode == 2
    assert "TLS" in result.stderr and "AE title" not in result.stderr, result.stderr
    plain = wlbridge("query", "--port", str(running.dicom_port), "--timeout", "10")
    assert plain.returncode == 2
    assert "TLS" in plain.stderr, plain.stderr
