"""Config-driven jobs behind the CLI: one :class:`~genunc.jobs.base.Job` per modality.

The CLI looks a config's ``modality`` up here; a new modality is one :func:`register_modality`
call naming its Job class (imported only when a config asks for it).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from genunc.errors import ConfigError

if TYPE_CHECKING:
    from genunc.jobs.base import Job

_MODALITIES: dict[str, str] = {
    "image": "genunc.jobs.image:ImageJob",
    "molecule": "genunc.jobs.molecule:MoleculeJob",
    "text": "genunc.jobs.text:TextJob",
    "vector": "genunc.jobs.vector:VectorJob",
}


def register_modality(name: str, job: str) -> None:
    """Make ``modality: <name>`` configs run the Job class ``"package.module:ClassName"``."""
    _MODALITIES[name] = job


def modalities() -> tuple[str, ...]:
    return tuple(_MODALITIES)


def job_for(modality: str) -> Job:
    """The job of a config's modality (its module is imported now)."""
    if modality not in _MODALITIES:
        raise ConfigError(f"unknown modality {modality!r}: {', '.join(_MODALITIES)}")
    module, name = _MODALITIES[modality].split(":")
    return getattr(import_module(module), name)()
