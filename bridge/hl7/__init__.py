"""HL7 v2 in and out: parsing, checks against hl7apy's versioned definitions, reading orders, the
field map, ACKs, the inbound handler, the order status messages to the RIS.
"""
