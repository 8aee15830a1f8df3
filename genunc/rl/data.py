"""Offline RL datasets: transitions of a behaviour policy, with what normalises their returns.

An :class:`OfflineDataset` holds D4RL's arrays (observations, actions in the env's units,
rewards, next observations, terminals, timeouts) and a metadata dict recording how it was made:
``env_id``, ``kind`` (``"medium"``, ``"medium-replay"``), the behaviour policy, the returns that
normalise scores (``random_return``, ``best_return``; also ``medium_return``), ``seed``,
``command``, ``created``, and the action bounds (``action_low``, ``action_high``).

Episodes are contiguous rows; one ends at a terminal or a timeout (the last row ends one too:
a dataset cut mid-episode marks it a timeout).  On disk a dataset is one compressed ``.npz``
(:meth:`OfflineDataset.save`): float16 arrays, the metadata as JSON inside, and a next
observation stored only where it is not the next row's observation (within an episode it
always is), so a file is about half the size of the arrays.  :meth:`OfflineDataset.load`
returns float32.  The shipped datasets are named ``zoo:rl/<env>-<kind>``, e.g.
``zoo:rl/hopper-medium`` (``genunc/zoo/weights/rl_hopper/medium.npz``).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from genunc._io import atomic_write
from genunc.errors import GenuncError, MissingFileError
from genunc.rl.envs import normalised_return
from genunc.streams import numpy_generator
from genunc.zoo.shipped import WEIGHTS_DIR

#: the ``format`` an OfflineDataset file names, and its version
FORMAT = "genunc.rl.OfflineDataset"
VERSION = 1
#: the arrays, in order; each has one row per transition
ARRAYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class OfflineDataset:
    """Transitions ``(s, a, r, s', terminal, timeout)``, one row each, and their metadata."""

    observations: np.ndarray  # (N, obs_dim)
    actions: np.ndarray  # (N, act_dim), in the env's units
    rewards: np.ndarray  # (N,)
    next_observations: np.ndarray  # (N, obs_dim)
    terminals: np.ndarray  # (N,) bool: the episode ended in a terminal state (no bootstrap)
    timeouts: np.ndarray  # (N,) bool: the episode was cut (time limit, or the data ends)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.observations = _rows(self.observations, "observations", np.float32, 2)
        self.actions = _rows(self.actions, "actions", np.float32, 2)
        self.rewards = _rows(self.rewards, "rewards", np.float32, 1)
        self.next_observations = _rows(self.next_observations, "next_observations", np.float32, 2)
        self.terminals = _rows(self.terminals, "terminals", bool, 1)
        self.timeouts = _rows(self.timeouts, "timeouts", bool, 1)
        n = len(self.observations)
        lengths = {name: len(getattr(self, name)) for name in ARRAYS}
        if set(lengths.values()) != {n}:
            raise GenuncError(f"an OfflineDataset's arrays have one row per transition; got {lengths}")
        if self.next_observations.shape != self.observations.shape:
            raise GenuncError(f"next_observations {self.next_observations.shape} must match "
                              f"observations {self.observations.shape}")
        self.metadata = dict(self.metadata)

    # ------------------------------------------------------------------ shape and episodes
    def __len__(self) -> int:
        return len(self.observations)

    @property
    def obs_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def act_dim(self) -> int:
        return self.actions.shape[1]

    @property
    def action_low(self) -> np.ndarray:
        """The env's lower action bounds (recorded in the metadata; else the data's minimum)."""
        low = self.metadata.get("action_low")
        return np.asarray(low, np.float32) if low is not None else self.actions.min(0)

    @property
    def action_high(self) -> np.ndarray:
        high = self.metadata.get("action_high")
        return np.asarray(high, np.float32) if high is not None else self.actions.max(0)

    def episode_slices(self) -> list[slice]:
        """Row ranges of the episodes, in order (an episode ends at a terminal or a timeout,
        and the last row ends one)."""
        ends = np.flatnonzero(self.terminals | self.timeouts)
        if len(self) and (not len(ends) or ends[-1] != len(self) - 1):
            ends = np.append(ends, len(self) - 1)
        starts = np.concatenate([[0], ends[:-1] + 1])
        return [slice(int(a), int(b) + 1) for a, b in zip(starts, ends)]

    def episodes(self) -> Iterator[OfflineDataset]:
        """The episodes one by one, each an OfflineDataset (views of these arrays)."""
        for rows in self.episode_slices():
            yield self._take(rows)

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode (float64), in order."""
        return np.array([float(self.rewards[rows].astype(np.float64).sum())
                         for rows in self.episode_slices()])

    def _take(self, rows: slice | np.ndarray, **metadata: Any) -> OfflineDataset:
        return replace(self, **{name: getattr(self, name)[rows] for name in ARRAYS},
                       metadata={**self.metadata, **metadata})

    def split(self, fraction: float, seed: int) -> tuple[OfflineDataset, OfflineDataset]:
        """``(kept, held_out)``: ``round(fraction * episodes)`` whole episodes (at least one, and
        one fewer than all) held out, chosen from the ``(seed, "dataset_split")`` stream; no
        episode is in both, and each part keeps the episodes' order.  For calibration or
        validation on transitions the model never trained on."""
        if not 0 < fraction < 1:
            raise GenuncError(f"split fraction must be in (0, 1), got {fraction}")
        slices = self.episode_slices()
        if len(slices) < 2:
            raise GenuncError(f"split needs at least 2 episodes, the dataset has {len(slices)}")
        n_out = min(max(1, round(fraction * len(slices))), len(slices) - 1)
        chosen = np.zeros(len(slices), bool)
        chosen[numpy_generator(seed, "dataset_split").permutation(len(slices))[:n_out]] = True
        rows = [np.arange(s.start, s.stop) for s in slices]
        held = np.concatenate([r for r, c in zip(rows, chosen) if c])
        kept = np.concatenate([r for r, c in zip(rows, chosen) if not c])
        record = {"fraction": float(fraction), "seed": int(seed), "episodes": len(slices)}
        return (self._take(kept, split={**record, "part": "kept"}),
                self._take(held, split={**record, "part": "held_out"}))

    # ------------------------------------------------------------------ scores
    def normalise_return(self, R: Any) -> Any:
        """D4RL's normalised return, with the random and best returns recorded with the data."""
        missing = [k for k in ("random_return", "best_return") if k not in self.metadata]
        if missing:
            raise GenuncError(f"this dataset records no {' or '.join(missing)}: its returns "
                              "cannot be normalised")
        return normalised_return(R, self.metadata["random_return"], self.metadata["best_return"])

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a compressed float16 ``.npz`` atomically (readers never see half a file)."""
        arrays = {name: getattr(self, name) for name in ARRAYS}
        for name in ("observations", "actions", "rewards", "next_observations"):
            if len(self) and float(np.abs(arrays[name]).max()) > _FLOAT16_MAX:
                raise GenuncError(f"{name} exceed float16's range ({_FLOAT16_MAX}); cannot save")
        obs, nxt = self.observations, self.next_observations
        # a next observation is stored only where it is not the next row's observation
        stored = np.ones(len(self), bool)
        if len(self) > 1:
            stored[:-1] = ~(nxt[:-1].astype(np.float16) == obs[1:].astype(np.float16)).all(1)
        payload = {
            "format": np.array(FORMAT), "version": np.array(VERSION),
            "metadata": np.array(json.dumps(_jsonable(self.metadata), sort_keys=True)),
            "observations": obs.astype(np.float16), "actions": self.actions.astype(np.float16),
            "rewards": self.rewards.astype(np.float16),
            "next_observations_stored": np.packbits(stored), "n": np.array(len(self)),
            "next_observations": nxt[stored].astype(np.float16),
            "terminals": np.packbits(self.terminals), "timeouts": np.packbits(self.timeouts),
        }
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **payload)
        return atomic_write(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OfflineDataset:
        """Read a file :meth:`save` wrote (float32 arrays), or a shipped one by name,
        ``zoo:rl/<env>-<kind>``; any other file is a one-line error saying so."""
        path = shipped_path(str(path)) if str(path).startswith("zoo:") else Path(path)
        if not path.is_file():
            raise MissingFileError(f"no offline dataset at {path}")
        what = f"{path} is not an OfflineDataset file (a .npz written by OfflineDataset.save)"
        try:
            npz = np.load(path, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise GenuncError(f"{what}: it is a single {type(npz).__name__}")
            with npz:
                files = dict(npz.items())
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            if isinstance(err, GenuncError):
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise GenuncError(f"{what}: {reason}") from None
        if str(files.get("format", "")) != FORMAT:
            raise GenuncError(f"{what}: it holds {', '.join(sorted(files)) or 'nothing'}")
        if int(files["version"]) > VERSION:
            raise GenuncError(f"{path} is an OfflineDataset of version {int(files['version'])}; "
                              f"this genunc reads up to {VERSION}: upgrade genunc")
        n = int(files["n"])
        obs = files["observations"].astype(np.float32)
        stored = np.unpackbits(files["next_observations_stored"], count=n).astype(bool)
        nxt = np.empty_like(obs)
        nxt[:-1] = obs[1:]
        nxt[stored] = files["next_observations"].astype(np.float32)
        return cls(observations=obs, actions=files["actions"].astype(np.float32),
                   rewards=files["rewards"].astype(np.float32), next_observations=nxt,
                   terminals=np.unpackbits(files["terminals"], count=n).astype(bool),
                   timeouts=np.unpackbits(files["timeouts"], count=n).astype(bool),
                   metadata=json.loads(str(files["metadata"])))


def shipped_dir(env_id: str) -> Path:
    """The folder of an env's shipped datasets: ``Hopper-v5`` -> ``genunc/zoo/weights/rl_hopper``."""
    return WEIGHTS_DIR / f"rl_{env_id.split('-v')[0].lower().replace('-', '_')}"


def shipped_path(name: str) -> Path:
    """``zoo:rl/hopper-medium`` (or ``hopper-medium``) -> the shipped ``.npz``."""
    short = name.removeprefix("zoo:rl/") if name.startswith("zoo:") else name
    env, _, kind = short.partition("-")
    if short == name and name.startswith("zoo:") or not env or not kind or "/" in short:
        raise GenuncError(f"a shipped dataset is named zoo:rl/<env>-<kind>, e.g. "
                          f"zoo:rl/hopper-medium; got {name!r} (shipped: {', '.join(shipped())})")
    path = WEIGHTS_DIR / f"rl_{env}" / f"{kind}.npz"
    if not path.is_file():
        raise MissingFileError(f"no shipped dataset {name!r}; shipped: {', '.join(shipped()) or 'none'}")
    return path


def shipped() -> list[str]:
    """The names of the shipped datasets, ``zoo:rl/<env>-<kind>``."""
    return sorted(f"zoo:rl/{folder.name.removeprefix('rl_')}-{file.stem}"
                  for folder in WEIGHTS_DIR.glob("rl_*") for file in folder.glob("*.npz"))


def _rows(value: Any, name: str, dtype: Any, ndim: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim == 1 and ndim == 2:
        array = array[:, None]
    if array.ndim != ndim:
        raise GenuncError(f"{name} must be {ndim}-d (one row per transition), got shape {array.shape}")
    array = array.astype(dtype, copy=False)
    if dtype is not bool and not np.isfinite(array).all():
        raise GenuncError(f"{name} holds NaN or infinite values")
    return array


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
