"""Exports of uncertainty-scored samples: one directory format for images, molecules and text."""

from genunc.export.select import filter_export
from genunc.export.store import Export, ExportWriter, atomic_write_bytes, atomic_write_text

__all__ = ["Export", "ExportWriter", "atomic_write_bytes", "atomic_write_text", "filter_export"]
