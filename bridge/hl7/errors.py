"""Errors that the ACK reports back to the sender."""

from __future__ import annotations

# HL7 table 0357 (message error condition codes) used by the bridge.
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
TABLE_VALUE_NOT_FOUND = "103"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
UNSUPPORTED_PROCESSING_ID = "202"
UNSUPPORTED_VERSION_ID = "203"
DUPLICATE_KEY_IDENTIFIER = "205"
APPLICATION_INTERNAL_ERROR = "207"


class HL7Error(Exception):
    """A reason not to apply a message, as the ACK's MSA-1 and ERR segment will carry it.

    `location` is `SEG^sequence^field^repetition^component` (ERR-2), or "" when the problem has no
    single place (an undecodable message, a disk error). `ack_code` is AE (the content is wrong)
    or AR (the bridge does not process such messages, or failed internally).
    """

    def __init__(self, code: str, location: str, text: str, ack_code: str = "AE") -> None:
        super().__init__(text)
        self.code = code
        self.location = location
        self.text = text
        self.ack_code = ack_code

    def __repr__(self) -> str:
        return f"HL7Error({self.ack_code} {self.code} at {self.location or '-'}: {self.text})"
