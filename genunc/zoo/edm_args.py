"""Reading an EDM output folder's ``args.pickle`` without running anything it might contain.

EDM (Hoogeboom et al., 2022) stores its training options as a pickled ``argparse.Namespace``.
A pickle can name any importable callable and call it while loading, so the file is read by an
unpickler that resolves exactly one global, ``argparse.Namespace``, and nothing else: a file
naming ``os.system`` (or any other function or class) is refused before anything is called.  The
options are then checked and kept as a plain :class:`EDMConfig`.
"""

from __future__ import annotations

import argparse
import io
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genunc.errors import ConfigError, MissingFileError

ARGS_FILE = "args.pickle"
WEIGHTS_FILES = ("generative_model_ema.npy", "generative_model.npy")
#: larger than any real args file (about 1 kB) by three orders of magnitude
MAX_ARGS_BYTES = 1 << 20


class UnsafePickleError(ConfigError):
    """An ``args.pickle`` that names something other than ``argparse.Namespace``."""


def _reconstruct(cls: Any, base: Any, state: Any) -> argparse.Namespace:
    """Protocols 0 and 1 rebuild objects with ``copyreg._reconstructor(cls, object, None)``; this
    stand-in builds an empty Namespace and nothing else (the attributes follow as plain state)."""
    if cls is not argparse.Namespace or base is not object or state is not None:
        raise UnsafePickleError("refusing a reconstructor call that does not build a Namespace")
    return argparse.Namespace()


class _NamespaceUnpickler(pickle.Unpickler):
    """Resolves ``argparse.Namespace`` (and, for protocols 0 and 1, a checked stand-in for
    ``copyreg._reconstructor`` with ``object``); refuses every other global and persistent id."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("argparse", "Namespace"):
            return argparse.Namespace
        if module in ("copyreg", "copy_reg") and name == "_reconstructor":
            return _reconstruct
        if module in ("builtins", "__builtin__") and name == "object":
            return object
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from an EDM args.pickle: only argparse.Namespace "
            "and plain values (numbers, strings, lists, dicts) are accepted"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent reference in an EDM args.pickle")


def read_args(path: str | Path) -> argparse.Namespace:
    """The ``argparse.Namespace`` pickled in `path`, loaded without executing anything else."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path} does not exist")
    data = path.read_bytes()
    if len(data) > MAX_ARGS_BYTES:
        raise UnsafePickleError(f"{path} is {len(data)} bytes; an EDM args.pickle is about 1 kB")
    try:
        args = _NamespaceUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except Exception as err:  # truncated or not a pickle at all
        raise ConfigError(f"{path} is not a readable pickle: {type(err).__name__}: {err}") from None
    if not isinstance(args, argparse.Namespace):
        raise ConfigError(f"{path} holds a {type(args).__name__}, not EDM's argparse.Namespace")
    return args


@dataclass(frozen=True)
class EDMConfig:
    """The options of an EDM run that decide the network and the diffusion."""

    n_layers: int = 9
    nf: int = 256
    inv_sublayers: int = 1
    attention: bool = True
    tanh: bool = True
    norm_constant: float = 1.0
    sin_embedding: bool = False
    condition_time: bool = True
    normalization_factor: float = 1.0
    aggregation_method: str = "sum"
    diffusion_steps: int = 1000
    diffusion_noise_schedule: str = "polynomial_2"
    diffusion_noise_precision: float = 1e-5
    normalize_factors: tuple[float, float, float] = (1.0, 4.0, 10.0)
    include_charges: bool = True
    context_node_nf: int = 0
    conditioning: tuple[str, ...] = ()
    dataset: str = "qm9"
    remove_h: bool = False
    model: str = "egnn_dynamics"
    probabilistic_model: str = "diffusion"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def atom_types(self) -> tuple[str, ...]:
        """EDM's atom decoder for the dataset."""
        if self.dataset.startswith("qm9"):
            return ("C", "N", "O", "F") if self.remove_h else ("H", "C", "N", "O", "F")
        raise ConfigError(f"EDM dataset {self.dataset!r} is not supported (QM9 only)")

    @property
    def n_features(self) -> int:
        """Atom features the network denoises: one-hot types, plus the charge if included."""
        return len(self.atom_types) + int(self.include_charges)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "EDMConfig":
        values = vars(args)
        missing = [k for k in ("n_layers", "nf", "diffusion_steps", "diffusion_noise_schedule",
                               "normalize_factors", "include_charges") if k not in values]
        if missing:
            raise ConfigError(f"EDM args lack {missing}: not an EDM training run")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: values[k] for k in known if k in values}
        kwargs["normalize_factors"] = tuple(float(v) for v in kwargs["normalize_factors"])
        kwargs["conditioning"] = tuple(kwargs.get("conditioning") or ())
        config = cls(**kwargs, extra={k: v for k, v in values.items() if k not in known})
        config.check()
        return config

    def check(self) -> None:
        if self.model != "egnn_dynamics" or self.probabilistic_model != "diffusion":
            raise ConfigError(f"only EDM's egnn_dynamics diffusion models load; this run is "
                              f"{self.model}/{self.probabilistic_model}")
        if self.aggregation_method not in ("sum", "mean"):
            raise ConfigError(f"unknown aggregation_method {self.aggregation_method!r}")
        schedule = self.diffusion_noise_schedule
        if not schedule.startswith("polynomial_"):
            raise ConfigError(f"noise schedule {schedule!r} is not supported (EDM's polynomial_* "
                              "schedules are; the learned one has other weights)")
        if len(self.normalize_factors) != 3:
            raise ConfigError(f"normalize_factors must hold 3 values, got {self.normalize_factors}")
        if len(self.conditioning) != self.context_node_nf:
            raise ConfigError(f"conditioning {list(self.conditioning)} does not match "
                              f"context_node_nf {self.context_node_nf}")

    @property
    def schedule_power(self) -> float:
        return float(self.diffusion_noise_schedule.split("_", 1)[1])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        return out


def read_config(folder: str | Path) -> EDMConfig:
    """The checked :class:`EDMConfig` of an EDM output folder."""
    return EDMConfig.from_namespace(read_args(Path(folder) / ARGS_FILE))


def weights_file(folder: str | Path) -> Path | None:
    """The EMA weights of an EDM folder (or its plain weights), None where there are none."""
    for name in WEIGHTS_FILES:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def is_edm_folder(folder: str | Path) -> bool:
    """Whether `folder` looks like an EDM output folder (``args.pickle`` + a weights file)."""
    return (Path(folder) / ARGS_FILE).is_file() and weights_file(folder) is not None
