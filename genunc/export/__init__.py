"""Exports of uncertainty-scored samples: one directory format for images, molecules and text."""

from genunc.export.select import filter_export
from genunc.export.store import Export, ExportWriter

__all__ = ["Export", "ExportWriter", "filter_export"]
