"""Fingerprints tie a saved posterior to the exact head it was fitted on.

A posterior's mean *is* the head's pretrained weights, and its curvature was measured on the
backbone's features: loading it onto another model (or a fine-tuned copy) would silently produce
meaningless draws.  The fingerprint records the head's name, class, parameter names, shapes and
dtypes, and a hash of its weights.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from genunc.errors import FingerprintMismatchError


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over the module's parameters (float32 bytes, name-ordered)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        data = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def head_fingerprint(head_name: str, head: nn.Module) -> dict[str, Any]:
    return {
        "head_name": head_name,
        "head_class": f"{type(head).__module__}.{type(head).__qualname__}",
        "params": [[n, list(p.shape), str(p.dtype).removeprefix("torch.")]
                   for n, p in head.named_parameters()],
        "weights_sha256": weights_digest(head),
    }


def check_fingerprint(
    saved: dict[str, Any], current: dict[str, Any], check_weights: bool = True
) -> None:
    """Refuse a posterior whose head differs from the model's; say exactly what differs."""
    problems = []
    for key in ("head_name", "head_class"):
        if saved[key] != current[key]:
            problems.append(f"{key}: saved {saved[key]!r}, model has {current[key]!r}")
    saved_params = {n: (s, d) for n, s, d in saved["params"]}
    current_params = {n: (s, d) for n, s, d in current["params"]}
    if saved_params.keys() != current_params.keys():
        problems.append(
            f"parameter names: saved {sorted(saved_params)}, model has {sorted(current_params)}"
        )
    else:
        for name, (shape, dtype) in saved_params.items():
            if [shape, dtype] != list(current_params[name]):
                problems.append(
                    f"parameter '{name}': saved shape {shape} {dtype}, model has "
                    f"{current_params[name][0]} {current_params[name][1]}"
                )
    if check_weights and not problems and saved["weights_sha256"] != current["weights_sha256"]:
        problems.append(
            "head weights differ from those the posterior was fitted at (the posterior mean); "
            "refit, or pass check_weights=False if you changed only the dtype or device"
        )
    if problems:
        raise FingerprintMismatchError(
            "this posterior was fitted on a different head:\n  - " + "\n  - ".join(problems)
        )
