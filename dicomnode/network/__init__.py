"""Receiving and sending over DICOM: the Storage SCP and its wire guard, the checks on a
received instance, the SCU that delivers results, storage commitment, and retrieval from a
PACS (C-MOVE/C-GET/WADO-RS)."""
