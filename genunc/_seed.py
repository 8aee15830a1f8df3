"""Turning what a user passes as a seed (an int, a generator or None) into a torch generator."""

from __future__ import annotations

import torch

from genunc.errors import GenuncError


def as_generator(
    seed: int | torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Generator:
    """Return a generator on `device`: an int seeds a fresh one, a generator passes through.

    `None` draws a seed from torch's global RNG, so callers who seed torch globally still get
    reproducible runs without threading a generator around.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


#: what a diffusers pipeline's ``generator`` argument takes
Generators = torch.Generator | list[torch.Generator]


def snapshot(generator: Generators) -> Generators:
    """Independent generators in the same state (one per generator of a list): what a wrapped
    pipeline gives each posterior draw's run, so every draw sees the MAP run's noise."""
    if isinstance(generator, (list, tuple)):
        return [snapshot(g) for g in generator]  # type: ignore[misc]
    if not isinstance(generator, torch.Generator):
        raise GenuncError(f"generator must be a torch.Generator or a list of them, got "
                          f"{type(generator).__name__}")
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
