"""QM9 with DFT coordinates, from the PyPI package ``qm9pack``, cached as compact arrays.

``import qm9pack`` fails on setuptools >= 82 (it imports ``pkg_resources``), so genunc locates the
package with ``importlib.util.find_spec`` and reads its CSVs directly.  The first call converts
the 225 MB of CSV into one ``.npz`` cache (float32 coordinates, uint8 atom types, ~35 MB); later
calls load the cache in under a second.

Split: EDM follows Cormorant: molecules ordered by their QM9 index, a seed-0 permutation, the
first 100,000 for training, 10% of all for test, the rest for validation.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from genunc._io import atomic_write
from genunc.errors import GenuncError

ATOM_TYPES = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
CACHE_VERSION = 1
#: atom counts of EDM's QM9 training molecules (with hydrogens), as EDM's configs record them:
#: the distribution EDM draws molecule sizes from
EDM_QM9_ATOM_HISTOGRAM = {
    3: 1, 4: 4, 5: 5, 6: 9, 7: 16, 8: 49, 9: 124, 10: 362, 11: 807, 12: 1689, 13: 3060, 14: 5136,
    15: 7796, 16: 10644, 17: 13025, 18: 13364, 19: 13832, 20: 9482, 21: 9970, 22: 3393, 23: 4848,
    24: 539, 25: 1506, 26: 48, 27: 266, 29: 25,
}
N_TRAIN = 100_000


def qm9pack_data_dir() -> Path:
    """The ``data`` folder of the installed ``qm9pack`` (without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or spec.origin is None:
        raise GenuncError("QM9 needs the PyPI package qm9pack: pip install qm9pack")
    folder = Path(spec.origin).parent / "data"
    if not (folder / "qm9_part1.csv").exists():
        raise GenuncError(f"qm9pack is installed but {folder} holds no qm9_part*.csv")
    return folder


def default_cache_path() -> Path:
    root = os.environ.get("GENUNC_CACHE") or Path.home() / ".cache" / "genunc"
    return Path(root) / f"qm9_v{CACHE_VERSION}.npz"


@dataclass
class QM9:
    """All molecules as ragged arrays: molecule ``i`` owns atoms ``offsets[i]:offsets[i+1]``."""

    positions: np.ndarray  # (total_atoms, 3) float32, Angstrom
    types: np.ndarray  # (total_atoms,) uint8 index into ATOM_TYPES
    offsets: np.ndarray  # (n_molecules + 1,) int64
    index: np.ndarray  # (n_molecules,) QM9 index (1-based, as in the dataset)
    smiles: list[str]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(self.offsets[i], self.offsets[i + 1])
        return self.positions[sl], self.types[sl]

    def subset(self, ids: np.ndarray) -> "QM9":
        ids = np.asarray(ids)
        counts = self.n_atoms[ids]
        offsets = np.concatenate([[0], np.cumsum(counts)])
        atoms = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in ids]) \
            if len(ids) else np.zeros(0, dtype=np.int64)
        return QM9(self.positions[atoms], self.types[atoms], offsets, self.index[ids],
                   [self.smiles[i] for i in ids])

    def padded(self, max_atoms: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense ``(n, max_atoms, 3)`` positions, ``(n, max_atoms)`` types and node mask."""
        n_max = int(self.n_atoms.max()) if max_atoms is None else max_atoms
        n = len(self)
        pos = np.zeros((n, n_max, 3), dtype=np.float32)
        typ = np.zeros((n, n_max), dtype=np.uint8)
        mask = np.zeros((n, n_max), dtype=bool)
        for i in range(n):
            p, t = self.molecule(i)
            pos[i, : len(t)], typ[i, : len(t)], mask[i, : len(t)] = p, t, True
        return pos, typ, mask

    def atom_count_histogram(self) -> dict[int, int]:
        values, counts = np.unique(self.n_atoms, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}


def parse_csvs(folder: Path, limit: int | None = None, progress: bool = True) -> QM9:
    """Read qm9pack's CSVs (columns Index, SMILES, Elements, XYZ_Ang), sorted by QM9 index."""
    csv.field_size_limit(sys.maxsize)
    code = {symbol: i for i, symbol in enumerate(ATOM_TYPES)}
    rows: list[tuple[int, str, list[str], list[list[float]]]] = []
    files = sorted(folder.glob("qm9_part*.csv"))
    bar = tqdm(desc="reading QM9 CSVs", unit="mol", disable=not progress, total=limit)
    for path in files:
        with path.open(newline="") as handle:
            for record in csv.DictReader(handle):
                elements = json.loads(record["Elements"].replace("'", '"'))
                xyz = _parse_xyz(record["XYZ_Ang"])
                if len(elements) != len(xyz):
                    raise GenuncError(f"QM9 index {record['Index']}: {len(elements)} elements but "
                                      f"{len(xyz)} coordinates")
                rows.append((int(record["Index"]), record["SMILES"], elements, xyz))
                bar.update(1)
                if limit is not None and len(rows) >= limit:
                    break
        if limit is not None and len(rows) >= limit:
            break
    bar.close()
    rows.sort(key=lambda r: r[0])
    counts = np.array([len(r[2]) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    positions = np.array([xyz for r in rows for xyz in r[3]], dtype=np.float32).reshape(-1, 3)
    types = np.array([code[e] for r in rows for e in r[2]], dtype=np.uint8)
    return QM9(positions, types, offsets, np.array([r[0] for r in rows], dtype=np.int64),
               [r[1] for r in rows])


def _parse_xyz(text: str) -> list[list[float]]:
    """``[[x,y,z],...]`` as written by qm9pack (``0.`` and Mathematica's ``*^`` exponents occur)."""
    flat = text.replace("[", "").replace("]", "").replace("*^", "e").split(",")
    values = [float(v) for v in flat]
    if len(values) % 3:
        raise GenuncError(f"coordinate list of {len(values)} numbers is not a list of xyz triples")
    return [values[i : i + 3] for i in range(0, len(values), 3)]


def save_cache(data: QM9, path: Path) -> Path:
    def write(target: Path) -> None:
        with open(target, "wb") as handle:  # a handle: savez would append .npz to a path
            np.savez_compressed(handle, positions=data.positions, types=data.types,
                                offsets=data.offsets, index=data.index, smiles=np.array(data.smiles))

    return atomic_write(path, write)


def load_cache(path: Path) -> QM9:
    with np.load(path, allow_pickle=False) as f:
        return QM9(f["positions"], f["types"], f["offsets"], f["index"], f["smiles"].tolist())


def load_qm9(cache: str | Path | None = None, progress: bool = True) -> QM9:
    """All of QM9 (130,831 molecules), building the cache on first use."""
    path = Path(cache) if cache else default_cache_path()
    if path.exists():
        return load_cache(path)
    data = parse_csvs(qm9pack_data_dir(), progress=progress)
    save_cache(data, path)
    return data


def edm_split(n_molecules: int, n_train: int = N_TRAIN, seed: int = 0) -> dict[str, np.ndarray]:
    """Cormorant/EDM split of molecule positions (in QM9-index order)."""
    if n_molecules <= n_train:
        raise GenuncError(f"{n_molecules} molecules cannot hold a {n_train}-molecule train split")
    n_test = int(0.1 * n_molecules)
    n_valid = n_molecules - n_train - n_test
    perm = np.random.RandomState(seed).permutation(n_molecules)
    return {"train": perm[:n_train], "valid": perm[n_train : n_train + n_valid],
            "test": perm[n_train + n_valid :]}
