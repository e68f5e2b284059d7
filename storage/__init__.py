"""Durable archive, index and job/delivery queue (SQLAlchemy): no DICOM networking, no model."""
