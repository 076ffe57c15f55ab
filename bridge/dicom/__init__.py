"""DICOM content: Part 10 reading, worklist items as datasets, C-FIND matching, and the MPPS
handlers' logic.
"""
