"""Molecule quality as EDM (Hoogeboom et al., 2022) measures it on QM9.

Bond orders come from interatomic distances: a pair is bonded with order 1, 2 or 3 when its
distance is below the typical single/double/triple bond length plus a margin (10, 5, 3 pm).
An atom is *stable* when its bond orders sum to its valence (H 1, C 4, N 3, O 2, F 1); a molecule
when all its atoms are.  *Valid* molecules are those RDKit can sanitize when built from these
bonds (largest fragment kept for the SMILES); *unique* counts distinct valid SMILES; *novel*
counts unique SMILES absent from the training set.

Bond lengths (pm) are the standard tables EDM uses (wiredchemist / chemistry-reference).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from genunc.data.qm9 import ATOM_TYPES, ATOMIC_NUMBERS

VALENCE = np.array([1, 4, 3, 2, 1])  # H C N O F
MARGINS_PM = (10.0, 5.0, 3.0)
_NONE = -1000.0
#            H      C      N      O      F
SINGLE = np.array([
    [74.0, 109.0, 101.0, 96.0, 92.0],  # H
    [109.0, 154.0, 147.0, 143.0, 135.0],  # C
    [101.0, 147.0, 145.0, 140.0, 136.0],  # N
    [96.0, 143.0, 140.0, 148.0, 142.0],  # O
    [92.0, 135.0, 136.0, 142.0, 142.0],  # F
])
DOUBLE = np.full((5, 5), _NONE)
for (a, b), length in {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125,
                       ("N", "O"): 121, ("O", "O"): 121}.items():
    i, j = ATOM_TYPES.index(a), ATOM_TYPES.index(b)
    DOUBLE[i, j] = DOUBLE[j, i] = length
TRIPLE = np.full((5, 5), _NONE)
for (a, b), length in {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}.items():
    i, j = ATOM_TYPES.index(a), ATOM_TYPES.index(b)
    TRIPLE[i, j] = TRIPLE[j, i] = length


def bond_orders(positions: np.ndarray, types: np.ndarray) -> np.ndarray:
    """``(n, n)`` integer bond orders from coordinates in Angstrom and type indices."""
    positions = np.asarray(positions, dtype=np.float64)
    types = np.asarray(types, dtype=np.int64)
    d = np.sqrt(((positions[:, None] - positions[None]) ** 2).sum(-1)) * 100.0  # pm
    ti, tj = types[:, None], types[None, :]
    order = np.zeros(d.shape, dtype=np.int64)
    single = d < SINGLE[ti, tj] + MARGINS_PM[0]
    order[single] = 1
    order[single & (d < DOUBLE[ti, tj] + MARGINS_PM[1])] = 2
    order[single & (d < TRIPLE[ti, tj] + MARGINS_PM[2])] = 3
    np.fill_diagonal(order, 0)
    return order


@dataclass
class Stability:
    stable_atoms: int
    n_atoms: int
    molecule_stable: bool


def stability(positions: np.ndarray, types: np.ndarray) -> Stability:
    valence_sum = bond_orders(positions, types).sum(1)
    stable = valence_sum == VALENCE[np.asarray(types, dtype=np.int64)]
    return Stability(int(stable.sum()), len(stable), bool(stable.all()))


def to_rdkit(positions: np.ndarray, types: np.ndarray):
    """An RDKit molecule with a conformer and the distance-table bonds (unsanitized)."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    orders = bond_orders(positions, types)
    mol = Chem.RWMol()
    for t in types:
        mol.AddAtom(Chem.Atom(ATOMIC_NUMBERS[int(t)]))
    kinds = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    for i, j in zip(*np.nonzero(np.triu(orders))):
        mol.AddBond(int(i), int(j), kinds[int(orders[i, j])])
    conformer = Chem.Conformer(len(types))
    for i, (x, y, z) in enumerate(np.asarray(positions, dtype=np.float64)):
        conformer.SetAtomPosition(i, Point3D(x, y, z))
    mol = mol.GetMol()
    mol.AddConformer(conformer, assignId=True)
    mol.UpdatePropertyCache(strict=False)  # lets unsanitizable molecules still be written to SDF
    return mol


def smiles_if_valid(positions: np.ndarray, types: np.ndarray) -> str | None:
    """Heavy-atom SMILES of the largest fragment if RDKit sanitizes the molecule, else None."""
    from rdkit import Chem, rdBase

    mol = to_rdkit(positions, types)
    blocker = rdBase.BlockLogs()  # invalid molecules are expected; keep RDKit quiet about them
    try:
        try:
            Chem.SanitizeMol(mol)
        except Exception:  # RDKit raises several exception types for invalid valences/kekulization
            return None
        fragments = Chem.GetMolFrags(mol, asMols=True, sanitizeFrags=False)
        largest = max(fragments, key=lambda m: m.GetNumAtoms())
        try:  # heavy-atom SMILES, comparable with the dataset's
            largest = Chem.RemoveHs(largest)
        except Exception:
            pass
        return Chem.MolToSmiles(largest)
    finally:
        del blocker


@dataclass
class MoleculeReport:
    """Per-molecule flags plus the aggregate rates EDM reports."""

    atom_stable_fraction: np.ndarray  # per molecule
    molecule_stable: np.ndarray
    valid: np.ndarray
    smiles: list[str | None]
    atom_stability: float
    molecule_stability: float
    validity: float
    uniqueness: float  # unique valid / valid
    valid_and_unique: float  # unique valid / all
    novelty: float | None  # novel unique / unique (None without training SMILES)

    def row(self) -> dict[str, float | None]:
        return {"atom_stability": self.atom_stability, "molecule_stability": self.molecule_stability,
                "validity": self.validity, "valid_and_unique": self.valid_and_unique,
                "uniqueness": self.uniqueness, "novelty": self.novelty}


def evaluate_molecules(molecules: Iterable[tuple[np.ndarray, np.ndarray]],
                       training_smiles: Sequence[str] | set[str] | None = None) -> MoleculeReport:
    """Stability, validity, uniqueness and novelty of ``(positions, types)`` molecules."""
    atom_frac, mol_stable, valid, smiles = [], [], [], []
    stable_atoms = total_atoms = 0
    for positions, types in molecules:
        s = stability(positions, types)
        stable_atoms += s.stable_atoms
        total_atoms += s.n_atoms
        atom_frac.append(s.stable_atoms / max(s.n_atoms, 1))
        mol_stable.append(s.molecule_stable)
        smi = smiles_if_valid(positions, types)
        smiles.append(smi)
        valid.append(smi is not None)
    n = len(valid)
    valid_smiles = [s for s in smiles if s is not None]
    unique = set(valid_smiles)
    novelty = None
    if training_smiles is not None and unique:
        train = set(training_smiles)
        novelty = len(unique - train) / len(unique)
    return MoleculeReport(
        atom_stable_fraction=np.array(atom_frac), molecule_stable=np.array(mol_stable),
        valid=np.array(valid), smiles=smiles,
        atom_stability=stable_atoms / max(total_atoms, 1),
        molecule_stability=float(np.mean(mol_stable)) if n else float("nan"),
        validity=float(np.mean(valid)) if n else float("nan"),
        uniqueness=len(unique) / len(valid_smiles) if valid_smiles else 0.0,
        valid_and_unique=len(unique) / n if n else float("nan"),
        novelty=novelty,
    )


def canonical_training_smiles(data_smiles: Iterable[str]) -> set[str]:
    """Canonicalise dataset SMILES with RDKit so that they compare with generated ones."""
    from rdkit import Chem

    out = set()
    for smi in data_smiles:
        mol = Chem.MolFromSmiles(smi)
        if mol is not None:
            out.add(Chem.MolToSmiles(mol))
    return out
