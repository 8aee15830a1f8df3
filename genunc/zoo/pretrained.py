"""``save_pretrained`` / ``from_pretrained`` for genunc's own reference models.

A model folder holds ``model.safetensors`` and ``config.json``; the config keeps the model's
constructor arguments (under ``"model"``, beside whatever else a recipe records, such as the
noise schedule or the task), so a folder is read back without knowing which recipe wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from genunc._io import atomic_write
from genunc.errors import MissingFileError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

M = TypeVar("M", bound="Pretrained")


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a model folder (a clear error where there is none)."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise MissingFileError(f"{directory} holds no {CONFIG_FILE}: not a genunc model folder")
    return json.loads(path.read_text())


class Pretrained:
    """Mixin for ``nn.Module`` reference models that keep their constructor arguments in
    ``self.config``."""

    config: dict[str, Any]
    #: where the constructor arguments sit in config.json (None: the whole file is them)
    CONFIG_KEY: ClassVar[str | None] = "model"

    def save_pretrained(self, directory: str | os.PathLike[str], **extra: Any) -> Path:
        """Write the weights and ``config.json`` (``extra`` entries are stored beside the model's
        arguments, e.g. ``timesteps`` or the task)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
        config = dict(self.config) if self.CONFIG_KEY is None else {self.CONFIG_KEY: self.config}
        atomic_write(directory / CONFIG_FILE, json.dumps({**config, **extra}, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls: type[M], directory: str | os.PathLike[str],
                        device: str | torch.device = "cpu") -> M:
        """The model saved in `directory`, in eval mode."""
        from safetensors.torch import load_file

        config = read_config(directory)
        model = cls(**(config if cls.CONFIG_KEY is None else config[cls.CONFIG_KEY]))
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.exists():
            raise MissingFileError(f"{directory} holds no {WEIGHTS_FILE}")
        model.load_state_dict(load_file(str(weights)))
        return model.to(device).eval()
