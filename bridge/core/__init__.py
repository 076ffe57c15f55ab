"""The worklist itself: its attribute registry, the one writer (the service) and the events it
publishes. No sockets, no HL7, no storage format.
"""
