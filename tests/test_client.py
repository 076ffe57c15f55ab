from bridge.client import ack_summary, split_messages


def test_split_plain_text_files_on_msh_and_normalise_line_ends():
    data = b"MSH|^~\\&|A|B\nPID|1\r\nOBR|1\n\nMSH|^~\\&|C|D\rPID|2\r"
    assert split_messages(data) == [b"MSH|^~\\&|A|B\rPID|1\rOBR|1\r", b"MSH|^~\\&|C|D\rPID|2\r"]


def test_split_mllp_framed_files():
    data = b"\x0bMSH|1\rPID|1\x1c\r\x0bMSH|2\x1c\r"
    assert split_messages(data) == [b"MSH|1\rPID|1", b"MSH|2"]


def test_ack_summary_reads_msa_and_err():
    ack = b"MSH|^~\\&|X|Y\rMSA|AE|C1|bad\rERR||ORC^1^7|102^Data type error^HL70357|E"
    code, control, detail = ack_summary(ack)
    assert (code, control) == ("AE", "C1")
    assert "102" in detail


def test_answer_rows_show_names_whole_and_multiple_values_joined():
    from pydicom import Dataset
    from pydicom.sequence import Sequence

    from bridge.client import answer_rows

    answer = Dataset()
    answer.PatientName = "MÜLLER^Jürgen"
    answer.PatientID = "P1"
    step = Dataset()
    step.ScheduledStationAETitle = ["CT1", "CT2"]
    answer.ScheduledProcedureStepSequence = Sequence([step])
    [row] = answer_rows([answer])
    assert row[0] == "MÜLLER^Jürgen" and row[1] == "P1"
    assert "CT1\\CT2" in row
