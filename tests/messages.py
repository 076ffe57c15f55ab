"""HL7 test messages built from a few parameters (segments joined with CR)."""

from __future__ import annotations


def segment(name: str, fields: dict[int, str]) -> str:
    """A segment with the given fields set by their HL7 number (MSH numbering included)."""
    if name == "MSH":
        last = max(fields)
        values = [fields.get(n, "") for n in range(3, last + 1)]
        return "MSH|^~\\&|" + "|".join(values)
    last = max(fields)
    return "|".join([name] + [fields.get(n, "") for n in range(1, last + 1)])


def orm(
    control_id: str = "MSG0001",
    order_control: str = "NW",
    order_status: str = "SC",
    version: str = "2.5.1",
    patient_id: str = "PAT001",
    patient_name: str = "DOE^JANE^Q",
    accession: str = "ACC0001",
    placer: str = "PLC0001",
    filler: str = "FIL0001",
    requested_procedure_id: str = "RP0001",
    sps_id: str = "SPS0001",
    modality: str = "CT",
    start: str = "202612011030",
    procedure: str = "CTHEAD^CT Head w/o contrast^LOCAL",
    study_uid: str = "1.2.826.0.1.3680043.10.543.1",
    charset: str = "",
    referring: str = "1234^WELBY^MARCUS^A^^DR",
    message_type: str = "ORM^O01",
    processing_id: str = "P",
    extra_groups: int = 0,
) -> str:
    """An ORM^O01 with one ORC/OBR/ZDS group (plus `extra_groups` more with derived IDs)."""
    segments = [
        segment(
            "MSH",
            {
                3: "RIS",
                4: "HOSP",
                5: "WLBRIDGE",
                6: "RAD",
                7: "20261127101500",
                9: message_type,
                10: control_id,
                11: processing_id,
                12: version,
                18: charset,
            },
        ),
        segment(
            "PID",
            {
                1: "1",
                3: f"{patient_id}^^^HOSP^MR",
                5: patient_name,
                7: "19700101",
                8: "F",
                11: "1 MAIN ST^^SPRINGFIELD",
            },
        ),
        segment("PV1", {1: "1", 2: "O", 3: "RAD^^^HOSP", 8: referring, 19: "V0001"}),
    ]
    for n in range(1 + extra_groups):
        suffix = "" if n == 0 else f"-{n}"
        segments += [
            segment(
                "ORC",
                {
                    1: order_control,
                    2: placer + suffix,
                    3: filler + suffix,
                    5: order_status,
                    7: f"^^^{start}^^R",
                    9: "20261127101500",
                    12: "7101^ESTRADA^JAIME^P^^DR",
                },
            ),
            segment(
                "OBR",
                {
                    1: str(n + 1),
                    2: placer + suffix,
                    3: filler + suffix,
                    4: procedure,
                    16: "7101^ESTRADA^JAIME^P^^DR",
                    18: accession + suffix,
                    19: requested_procedure_id + suffix,
                    20: sps_id + suffix,
                    24: modality,
                    27: f"^^^{start}^^R",
                },
            ),
            segment("ZDS", {1: f"{study_uid}{'.' + str(n) if n else ''}^100^Application^DICOM"}),
        ]
    return "\r".join(segments) + "\r"
