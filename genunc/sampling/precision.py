"""Reduced precision for the backbone only: the denoiser's forward pass runs under autocast
(bfloat16 / float16, the speed-up GPUs give), while everything the scores are made of stays in
full precision: the captured head input is cast back to float32 before posterior draws are
applied to it or its closed-form variance is taken, and model outputs are cast to the sampler
state's dtype before a scheduler step.  On a CPU bfloat16 autocast works too (slower, but it
lets the path be tested anywhere)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from genunc.errors import GenuncError

PRECISIONS: dict[str, torch.dtype | None] = {
    "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def backbone_autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context the backbone call runs in: nothing for ``float32``, else autocast."""
    if precision not in PRECISIONS:
        raise GenuncError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device) -> AbstractContextManager:
    """Autocast switched off (inside a backbone call: for the head draws' own arithmetic)."""
    return torch.autocast(device_type=device.type, enabled=False)
