"""Installed library versions known not to work together, checked where they are used.

pyproject.toml's ranges keep a fresh ``pip install genunc[text]`` clear of them, but an
environment can still get there (another package pulls a newer transformers; a pin by hand).
Then genunc refuses before anything runs, in one line naming both versions and the fix,
instead of a ``TypeError`` from deep inside a library.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from genunc.errors import GenuncError


@dataclass(frozen=True)
class KnownBreak:
    """``feature`` fails when every ``package: specifier`` in ``when`` holds."""

    feature: str
    when: tuple[tuple[str, str], ...]
    why: str
    fix: str


KNOWN_BREAKS = (
    KnownBreak(
        feature="DiffusionGemmaPipeline",
        when=(("transformers", ">=5.24"), ("diffusers", "<=0.42.1")),
        why="transformers 5.24 renamed past_key_values to cache in "
            "DiffusionGemmaDecoderModel.create_diffusion_decoder_attention_mask, which this "
            "diffusers still calls with past_key_values",
        fix="pip install 'transformers<5.24' (or a diffusers release newer than 0.42.1)",
    ),
)


def installed_version(package: str) -> Version | None:
    """The installed distribution's version, or None when it is not installed."""
    try:
        return Version(metadata.version(package))
    except metadata.PackageNotFoundError:
        return None


def check_compatible(feature: str) -> None:
    """Raise :class:`GenuncError` if the installed versions are a known-broken pair for `feature`."""
    for known in KNOWN_BREAKS:
        if known.feature != feature:
            continue
        versions = {name: installed_version(name) for name, _ in known.when}
        if all(versions[name] is not None and SpecifierSet(spec).contains(versions[name],
                                                                          prereleases=True)
               for name, spec in known.when):
            pair = " with ".join(f"{name} {versions[name]}" for name, _ in known.when)
            raise GenuncError(f"{feature} does not run on {pair}: {known.why}; fix: {known.fix}")
