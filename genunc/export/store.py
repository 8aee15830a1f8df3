"""One export format for every modality: sample files + a manifest + run metadata.

Layout of an export directory::

    run.json           run metadata: model, posterior fingerprint, config, genunc version, format
    manifest.jsonl     one JSON record per committed sample (append-only; the source of truth)
    manifest.csv       the same records as a table (written by ``finalize``)
    manifest.parquet   idem, when pyarrow is installed
    samples/<id>.png | .sdf | .json
    samples.sdf / samples.jsonl   all molecules / texts in one file (written by ``finalize``)

Crash safety: a sample's file is written to a temporary name, flushed and renamed; only then is
its manifest line appended and flushed.  A crash can leave at most an orphan sample file (no
manifest line) or a torn last manifest line; reopening truncates the torn line, and the orphan is
simply rewritten when the run resumes, so nothing is lost and nothing is duplicated.  A damaged
line anywhere else is never skipped or cut: reading stops with an error naming the file and the
line, and ``genunc repair`` moves such lines to ``manifest.quarantine.jsonl``.

Honesty: a writer holds an advisory lock on the folder (a second writer is refused), resumes
only an export of the same ``identity`` (the differing entries are named), and removes the
folder again when it fails before committing a single sample.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from genunc._io import atomic_write
from genunc._version import __version__
from genunc.errors import GenuncError, MissingFileError

FORMAT_VERSION = 1
FORMATS = {"png": ".png", "sdf": ".sdf", "json": ".json"}
MANIFEST = "manifest.jsonl"
QUARANTINE = "manifest.quarantine.jsonl"
RUN = "run.json"
LOCK = ".lock"


# ------------------------------------------------------------------------------ payload encoders
def encode_png(image: Any) -> bytes:
    """An image tensor/array ``(C, H, W)`` or ``(H, W)`` in [-1, 1] as PNG bytes."""
    from PIL import Image

    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float64)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    pixels = np.clip((array + 1) * 127.5, 0, 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_sdf(mol: Any, properties: Mapping[str, Any]) -> bytes:
    """An RDKit molecule with `properties` attached as SD tags."""
    from rdkit import Chem

    mol = Chem.Mol(mol)
    for key, value in properties.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            mol.SetProp(key, str(int(value)))
        elif isinstance(value, (int, np.integer)):
            mol.SetIntProp(key, int(value))
        elif isinstance(value, (float, np.floating)):
            mol.SetDoubleProp(key, float(value))
        else:
            mol.SetProp(key, str(value))
    buffer = io.StringIO()
    writer = Chem.SDWriter(buffer)
    writer.write(mol)
    writer.close()
    return buffer.getvalue().encode()


def encode_json(payload: Any, properties: Mapping[str, Any]) -> bytes:
    return (json.dumps({**properties, "sample": payload}, default=_json_default) + "\n").encode()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__}")


# ------------------------------------------------------------------------------ writer
class ExportWriter:
    """Append scored samples to an export directory; safe to interrupt and resume.

    Use as a context manager; ``finalize`` (called on clean exit) writes the CSV/Parquet tables
    and the combined SDF/JSONL.  ``resume=True`` (default) continues an existing export of the
    same format: samples whose id is already committed are skipped by :meth:`add`.
    """

    def __init__(self, directory: str | os.PathLike[str], fmt: str,
                 metadata: Mapping[str, Any] | None = None, resume: bool = True) -> None:
        if fmt not in FORMATS:
            raise GenuncError(f"unknown export format {fmt!r}; choose from {sorted(FORMATS)}")
        self.directory = Path(directory)
        self.format = fmt
        self.samples_dir = self.directory / "samples"
        self._created = not self.directory.exists()
        self._wrote_run = False  # set by _open; what a failed run must undo
        self.records: list[dict[str, Any]] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.directory)
        try:
            self._open(dict(metadata or {}), resume)
        except BaseException:
            self._release(failed=True)
            raise

    def _open(self, metadata: dict[str, Any], resume: bool) -> None:
        existing = (self.directory / RUN).exists()
        self._wrote_run = not existing
        if existing and not resume:
            raise GenuncError(f"{self.directory} already holds an export; pass resume=True or "
                              "choose a new directory")
        if existing:
            run = json.loads((self.directory / RUN).read_text())
            if run.get("format") != self.format:
                raise GenuncError(f"{self.directory} holds a {run.get('format')} export, not "
                                  f"{self.format}")
            _check_identity(self.directory, run.get("identity"), metadata.get("identity"))
            self.metadata = run
        else:
            self.metadata = {"format_version": FORMAT_VERSION, "format": self.format,
                             "genunc_version": __version__, **metadata}
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.directory / RUN, json.dumps(self.metadata, indent=2,
                                                          default=_json_default) + "\n")
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        self.records = _read_manifest(self.directory / MANIFEST, repair=True)
        self._ids = {r["sample_id"] for r in self.records}
        self._committed_here = 0
        self._manifest = (self.directory / MANIFEST).open("a")

    def __contains__(self, sample_id: str) -> bool:
        return str(sample_id) in self._ids

    def add(self, sample_id: str | int, payload: Any, record: Mapping[str, Any]) -> bool:
        """Commit one sample (file, then manifest line).  Returns False if it was already there."""
        sample_id = str(sample_id)
        if not sample_id or "/" in sample_id or sample_id.startswith("."):
            raise GenuncError(f"invalid sample id {sample_id!r}")
        if sample_id in self._ids:
            return False
        properties = {"sample_id": sample_id, **record}
        filename = f"{sample_id}{FORMATS[self.format]}"
        if self.format == "png":
            data = encode_png(payload)
        elif self.format == "sdf":
            data = encode_sdf(payload, properties)
        else:
            data = encode_json(payload, properties)
        atomic_write(self.samples_dir / filename, data)
        line = {**properties, "file": f"samples/{filename}"}
        self._manifest.write(json.dumps(line, default=_json_default) + "\n")
        self._manifest.flush()
        os.fsync(self._manifest.fileno())
        self.records.append(json.loads(json.dumps(line, default=_json_default)))
        self._ids.add(sample_id)
        self._committed_here += 1
        return True

    def finalize(self) -> Path:
        self._manifest.close()
        try:
            write_tables(self.directory, self.records)
            combine_samples(self.directory, self.format, self.records)
        finally:
            self._release(failed=False)
        return self.directory

    def close(self, failed: bool = False) -> None:
        """Stop writing; with ``failed=True`` a folder this writer created and never committed a
        sample to is removed again (a corrected run then starts afresh)."""
        if not self._manifest.closed:
            self._manifest.close()
        self._release(failed)

    def _release(self, failed: bool) -> None:
        if self._lock is None:
            return
        if failed and not self.records:
            if self._created:
                shutil.rmtree(self.directory, ignore_errors=True)
            elif self._wrote_run:  # a folder the user made: undo our files
                for name in (RUN, MANIFEST, LOCK):
                    (self.directory / name).unlink(missing_ok=True)
                if self.samples_dir.is_dir() and not any(self.samples_dir.iterdir()):
                    self.samples_dir.rmdir()
        self._lock.close()  # closing the handle releases the lock
        self._lock = None

    def __enter__(self) -> "ExportWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.close(failed=True)


def _lock(directory: Path) -> Any:
    """An exclusive advisory lock on the export folder, held while a writer is open."""
    handle = (directory / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise GenuncError(f"another genunc process is writing to {directory}; wait for it to "
                          "finish, or write to another folder") from None
    return handle


def being_written(directory: Path) -> bool:
    """Whether a writer holds the folder's lock (a shared lock would have to wait for it)."""
    try:
        handle = (directory / LOCK).open("r")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def _check_identity(directory: Path, saved: Mapping[str, Any] | None,
                    current: Mapping[str, Any] | None) -> None:
    """Refuse to resume an export made by a different config, model or posterior."""
    if saved is None or current is None:
        return
    keys = sorted(set(saved) | set(current))
    differ = [f"  {k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
              for k in keys if saved.get(k) != current.get(k)]
    if differ:
        raise GenuncError(f"{directory} was written by a different run; it differs in:\n"
                          + "\n".join(differ)
                          + "\nresume with the original settings, or write to a new `out`")


def _read_manifest(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Committed records.  Only a torn *last* line (a crash mid-append) is dropped (and cut, if
    `repair`); a damaged line followed by others is an error, never a silently shorter export."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end, seen = [], 0, set()
    lines = raw.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        record = _parse_line(line)
        if record is None:
            if number == len(lines) and not line.endswith(b"\n"):
                break  # the torn tail of an interrupted append
            raise GenuncError(
                f"{path}, line {number}: not a manifest record ({line[:60]!r}); nothing after it "
                f"is lost, but the export cannot be read until the line is removed: "
                f"`genunc repair {path.parent}` moves damaged lines to {QUARANTINE}")
        if record["sample_id"] not in seen:  # defensive: a resumed run never writes twice
            seen.add(record["sample_id"])
            records.append(record)
        good_end += len(line)
    if repair and good_end != len(raw):
        with path.open("r+b") as handle:
            handle.truncate(good_end)
    return records


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("sample_id"), str) \
        and isinstance(record.get("file"), str) and line.endswith(b"\n")
    return record if ok else None


def repair_manifest(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """Move every damaged manifest line to ``manifest.quarantine.jsonl`` (appended, verbatim)
    and rewrite the manifest with the good ones.  Returns ``(kept, quarantined)``."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        raise MissingFileError(f"{directory} holds no {MANIFEST}")
    with _lock(directory):
        good, bad = [], []
        for line in path.read_bytes().splitlines(keepends=True):
            (good if _parse_line(line) is not None else bad).append(line)
        if bad:
            with (directory / QUARANTINE).open("ab") as handle:
                handle.write(b"".join(b if b.endswith(b"\n") else b + b"\n" for b in bad))
            atomic_write(path, b"".join(good))
    return len(good), len(bad)


def write_tables(directory: Path, records: list[dict[str, Any]]) -> None:
    """manifest.csv (and manifest.parquet with pyarrow) from the manifest records."""
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for record in records:
        writer.writerow({k: _cell(record.get(k)) for k in columns})
    atomic_write(directory / "manifest.csv", buffer.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in records])
    atomic_write(directory / "manifest.parquet", lambda path: pq.write_table(table, path))


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def combine_samples(directory: Path, fmt: str, records: list[dict[str, Any]]) -> None:
    """samples.sdf / samples.jsonl: every sample in manifest order, in one file."""
    if fmt == "png":
        return
    name = "samples.sdf" if fmt == "sdf" else "samples.jsonl"
    parts = [(directory / r["file"]).read_bytes() for r in records]
    for record, part in zip(records, parts):
        _check_sample_file(directory / record["file"], fmt, part)
    atomic_write(directory / name, b"".join(parts))


def _check_sample_file(path: Path, fmt: str, data: bytes) -> None:
    """One complete record per sample file, so that one damaged file cannot swallow its
    neighbours when all are joined into samples.sdf / samples.jsonl."""
    if fmt == "sdf":
        ends = [line.strip() for line in data.splitlines()].count(b"$$$$")
        ok = ends == 1 and data.rstrip().endswith(b"$$$$")
    else:
        ok = data.endswith(b"\n") and data.count(b"\n") == 1 and _parse_json(data)
    if not ok:
        raise GenuncError(f"{path} is damaged (not one complete {fmt} record); delete it and its "
                          "manifest line (genunc repair) or restore it")


def _parse_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


# ------------------------------------------------------------------------------ reading / filtering
class Export:
    """A read-only view of an export directory.

    An export another process is still writing is refused (a filter or an evaluation of it
    would silently cover fewer samples than the run makes); ``partial=True`` reads the samples
    committed so far, to watch a run.
    """

    def __init__(self, directory: str | os.PathLike[str], partial: bool = False) -> None:
        self.directory = Path(directory)
        if not (self.directory / RUN).exists():
            raise MissingFileError(f"{self.directory} is not a genunc export (no {RUN})")
        if not partial and being_written(self.directory):
            raise GenuncError(f"{self.directory} is still being written by a genunc run; wait "
                              "for it to finish (or read what is committed so far with "
                              "Export(..., partial=True))")
        try:
            self.metadata: dict[str, Any] = json.loads((self.directory / RUN).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise GenuncError(f"{self.directory / RUN} is damaged (not JSON)") from None
        self.records = _read_manifest(self.directory / MANIFEST)

    @property
    def format(self) -> str:
        return self.metadata["format"]

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str) -> np.ndarray:
        missing = [r["sample_id"] for r in self.records if name not in r]
        if missing:
            available = sorted({k for r in self.records for k in r})
            raise GenuncError(f"column {name!r} missing for {len(missing)} samples; "
                              f"available: {available}")
        return np.array([r[name] for r in self.records])

    def path(self, record: Mapping[str, Any]) -> Path:
        return self.directory / record["file"]


def write_subset(source: Export, indices: Iterable[int], destination: str | os.PathLike[str],
                 provenance: Mapping[str, Any], link: str = "copy") -> Path:
    """A new export holding the selected records of `source` (which is left untouched)."""
    destination = Path(destination)
    if destination.resolve() == source.directory.resolve():
        raise GenuncError("the filtered export must go to a new directory")
    if (destination / RUN).exists():
        raise GenuncError(f"{destination} already holds an export")
    if link not in ("copy", "symlink"):
        raise GenuncError(f"link must be copy or symlink, got {link!r}")
    put: Callable[[Path, Path], Any] = shutil.copy2 if link == "copy" else \
        (lambda src, dst: os.symlink(src.resolve(), dst))
    (destination / "samples").mkdir(parents=True, exist_ok=True)
    chosen = [source.records[i] for i in indices]
    manifest = io.StringIO()
    for record in chosen:
        target = destination / record["file"]
        if not target.exists():
            put(source.path(record), target)
        manifest.write(json.dumps(record) + "\n")
    atomic_write(destination / MANIFEST, manifest.getvalue())
    metadata = {**source.metadata, "filtered_from": str(source.directory.resolve()),
                "filter": dict(provenance), "n_source": len(source), "n_kept": len(chosen)}
    atomic_write(destination / RUN, json.dumps(metadata, indent=2, default=_json_default) + "\n")
    write_tables(destination, chosen)
    combine_samples(destination, source.format, chosen)
    return destination


def merge_exports(sources: list[Export], destination: str | os.PathLike[str],
                  names: list[str]) -> Export:
    """One export holding every record of `sources` (shards of one run, named `names`), ordered
    by sample id: the export one process would have written.  The sources must share format and
    identity and no sample id; `destination` may hold an earlier merge of them, never anything
    else."""
    destination = Path(destination)
    first = sources[0]
    for name, source in zip(names[1:], sources[1:]):
        if source.format != first.format:
            raise GenuncError(f"shard {name} is a {source.format} export, {names[0]} {first.format}")
        a, b = first.metadata.get("identity") or {}, source.metadata.get("identity") or {}
        differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if differ:
            raise GenuncError(f"shard {name} was made by another run than {names[0]}; they differ "
                              f"in {', '.join(differ)}")
    if (destination / RUN).exists():
        run = json.loads((destination / RUN).read_text())
        if "merged_from" not in run:
            raise GenuncError(f"{destination} already holds an export that was not merged from "
                              "shards; merge into another folder")
    seen: dict[str, str] = {}
    records: list[tuple[dict[str, Any], Export]] = []
    for name, source in zip(names, sources):
        for record in source.records:
            if record["sample_id"] in seen:
                raise GenuncError(f"sample {record['sample_id']} is in shards {seen[record['sample_id']]} "
                                  f"and {name}")
            seen[record["sample_id"]] = name
            records.append((record, source))
    records.sort(key=lambda pair: (len(pair[0]["sample_id"]), pair[0]["sample_id"]))
    (destination / "samples").mkdir(parents=True, exist_ok=True)
    manifest = io.StringIO()
    for record, source in records:
        target = destination / record["file"]
        atomic_write(target, source.path(record).read_bytes())
        manifest.write(json.dumps(record) + "\n")
    atomic_write(destination / MANIFEST, manifest.getvalue())
    metadata = {k: v for k, v in first.metadata.items() if k != "shard"}
    metadata["merged_from"] = list(names)
    atomic_write(destination / RUN, json.dumps(metadata, indent=2, default=_json_default) + "\n")
    chosen = [record for record, _ in records]
    write_tables(destination, chosen)
    combine_samples(destination, first.format, chosen)
    return Export(destination)
