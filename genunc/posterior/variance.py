"""How much the denoiser's prediction varies under the head posterior, at one sampler step.

Two estimators of the same quantity, the per-element variance of the model output given the
backbone features ``phi`` of the MAP trajectory:

* :class:`ExactVariance` (default): every genunc head is linear in its weights, so under a
  diagonal Gaussian posterior the variance has a closed form
  (:meth:`HeadPosterior.output_variance`): no Monte-Carlo noise, and cheaper than M draws.
* :class:`MonteCarloVariance`: the sample variance of M head draws' predictions (unbiased, so its
  mean over draw sets is the exact value); the route for non-diagonal posteriors and a check.

Both are the ``(phi, inputs) -> (B, ...)`` callables the sampling loop takes
(:data:`genunc.sampling.diffusers_loop.HeadVariance`): variances shaped like one model output,
which the adapter reduces to per-sample numbers (:meth:`DenoiserAdapter.reduce_variance`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from genunc.adapters.base import DenoiserAdapter
from genunc.errors import GenuncError

if TYPE_CHECKING:
    from genunc.posterior.draws import HeadDraws
    from genunc.posterior.laplace_head import HeadPosterior


class MonteCarloVariance:
    """Sample variance of the predictions of M >= 2 head draws.

    ``combine`` maps the draws' outputs ``(M, rows, ...)`` to the predictions whose variance is
    wanted (a guidance rule that is not affine in the head's output, such as rescaled
    classifier-free guidance).  With ``jackknife=True`` (M >= 3) the call returns
    ``(1 + M, B, ...)``: the variance, then its M leave-one-draw-out replicates, from which the
    pipelines report the jackknife standard error of the score (``replicates`` tells the loop
    which form it gets).
    """

    def __init__(self, adapter: DenoiserAdapter, draws: HeadDraws | Any,
                 jackknife: bool = False,
                 combine: Callable[[Tensor], Tensor] | None = None) -> None:
        if len(draws) < (3 if jackknife else 2):
            raise GenuncError("a Monte-Carlo variance with its standard error needs num_draws >= 3"
                              if jackknife else
                              "a Monte-Carlo variance compares draws: it needs num_draws >= 2")
        if draws.with_map:
            raise GenuncError("pass the perturbed draws only (without the MAP)")
        self.adapter, self.draws, self.replicates = adapter, draws, jackknife
        self.combine = combine

    def __call__(self, phi: Any, inputs: Mapping[str, Any]) -> Tensor:
        out = self.adapter.post_head(self.draws.apply(phi), inputs).double()
        if self.combine is not None:  # e.g. a nonlinear guidance rule over the batch's halves
            out = self.combine(out)
        if not self.replicates:
            return out.var(0)
        m = out.shape[0]
        keep = ~torch.eye(m, dtype=torch.bool, device=out.device)
        loo = torch.stack([out[keep[i]].var(0) for i in range(m)])
        return torch.cat([out.var(0).unsqueeze(0), loo])


class ExactVariance:
    """Closed-form variance under a diagonal posterior (no draws)."""

    def __init__(self, adapter: DenoiserAdapter, posterior: HeadPosterior) -> None:
        if posterior.structure != "diag":
            raise GenuncError(f"the exact variance needs the diagonal posterior; this one is "
                              f"{posterior.structure!r}: use variance='monte_carlo'")
        self.adapter, self.posterior = adapter, posterior

    def __call__(self, phi: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        return self.adapter.head_output_variance(self.posterior, phi, inputs).double()


class MonteCarloTailVariance(MonteCarloVariance):
    """Variance of the model output under a *tail* posterior, over M >= 3 draws.

    A tail passes its weights through nonlinearities, so there is no closed form: the tail is
    re-run under the M draws on the MAP trajectory's recorded tail inputs (one batched call),
    and the sample variance of the M outputs (after ``post_head``) comes with its jackknife
    replicates (:class:`MonteCarloVariance` with ``jackknife=True``).
    """

    def __init__(self, adapter: DenoiserAdapter, draws: Any,
                 combine: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(adapter, draws, jackknife=True, combine=combine)
        self.tail = draws.tail
