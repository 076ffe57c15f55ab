"""wlbridge: HL7 v2 imaging orders in, DICOM Modality Worklist out.

The data path is a pipeline, one module per step:

    mllp (frame) -> hl7message (message) -> order (procedure steps)
    -> worklist_item (DICOM dataset) -> store (.wl file) -> index/matching/cfind (C-FIND)

`pipeline` ties the steps together for one message and answers with an ACK (`ack`);
`translation_log` records what each message became; `server` hosts MLLP and DICOM in one process.
"""

__version__ = "0.1.0"
