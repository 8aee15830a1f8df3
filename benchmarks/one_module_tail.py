"""The marginal-likelihood prior precision of a head posterior, a one-module tail over the head,
and a last-block tail, on the tests' two-layer masked-diffusion text model (its classes without
data frozen): a one-module tail is the head posterior, so the first two must agree.

Usage:  python benchmarks/one_module_tail.py
"""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "sampling"))

from test_tail_unmasking import MASK, L, V, _batches  # noqa: E402  the tests' data

from genunc.adapters.text import MaskedDiffusionLMAdapter  # noqa: E402
from genunc.posterior import HeadPosterior, TailPosterior, default_tail  # noqa: E402
from genunc.zoo.text_model import MaskedDiffusionTransformer  # noqa: E402


def main() -> None:
    torch.manual_seed(0)  # the model of the tests' `adapter` fixture
    model = MaskedDiffusionTransformer(V, L, d_model=16, n_layers=1, n_heads=2).eval()
    model.blocks = nn.TransformerEncoder(model.blocks.layers[0], 2, enable_nested_tensor=False)
    torch.manual_seed(3)
    for p in model.blocks.layers[1].parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    adapter = MaskedDiffusionLMAdapter(model.eval(), "head", MASK)
    head = HeadPosterior.fit(adapter, _batches(), repeats=2, progress=False)
    one = TailPosterior.fit(adapter, _batches(), ["head"], repeats=2)
    block = TailPosterior.fit(adapter, _batches(), default_tail(model, 1), repeats=2)
    print(f"marginal-likelihood prior precision: head {head.prior_precision:.4g}, "
          f"one-module tail {one.prior_precision:.4g}, last-block tail "
          f"{block.prior_precision:.4g}")


if __name__ == "__main__":
    main()
