"""The network adapters: the MLLP listener and clients, the DICOM server and its C-FIND SCP, the
pynetdicom speed-ups and bounds, TLS, the outbox's delivery.
"""
