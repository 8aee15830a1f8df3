"""The clean sample a denoiser's prediction implies at one step: the scheduler's own
``pred_original_sample`` rule, for any number of predictions at once (the M+1 head draws).

One function, :func:`predicted_clean`, follows diffusers' schedulers exactly:

* ``DDIMScheduler`` / ``DDPMScheduler`` (and every scheduler with an ``alphas_cumprod`` table
  indexed by the timestep): with ``abar = alphas_cumprod[t]``,
  epsilon ``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)``, v-prediction
  ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``, sample prediction ``x0 = output``; then the
  scheduler's ``thresholding`` (its own ``_threshold_sample``) or ``clip_sample`` to
  ``clip_sample_range``, as its ``step`` does;
* ``FlowMatchEulerDiscreteScheduler`` (and other flow-matching schedulers): the velocity
  ``v = eps - x0`` gives ``x0 = x_t - sigma v`` with ``sigma = t / num_train_timesteps`` (flow
  pipelines pass ``t = sigma * num_train_timesteps``; the scheduler's ``stochastic_sampling``
  step uses the same ``x0``).

Fractional timesteps (Karras-sigma samplers) read ``alphas_cumprod`` linearly interpolated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from genunc.errors import GenuncError


def predicted_clean(scheduler: Any, output: Tensor, sample: Tensor, timestep: Any) -> Tensor:
    """The clean sample ``x0`` the scheduler's ``step`` would predict from ``output``.

    Args:
        scheduler: a diffusers scheduler (its config and tables are read, never changed).
        output: the model's prediction (``(K, B, ...)`` for K predictions at one input, or
            ``(B, ...)``), only the channels the sampler steps with.
        sample: the current sample ``x_t`` ``(B, ...)`` the prediction was made at (the
            denoiser's input: schedulers whose ``scale_model_input`` is the identity).
        timestep: the scheduler timestep of the step (a number or a 0-d / ``(B,)`` tensor).

    Returns ``x0`` shaped like `output`, in float32 (float64 in, float64 out).
    """
    dtype = torch.float64 if output.dtype == torch.float64 else torch.float32
    output, sample = output.to(dtype), sample.to(output.device, dtype)
    t = torch.as_tensor(timestep).reshape(-1)[0].to(torch.float64).cpu()
    config = getattr(scheduler, "config", None)
    if config is None:
        raise GenuncError(f"{type(scheduler).__name__} is not a diffusers scheduler (no config): "
                          "genunc cannot express its clean-sample prediction")
    if "FlowMatch" in type(scheduler).__name__:
        sigma = float(t) / float(config.num_train_timesteps)
        return sample - sigma * output
    kind = config.get("prediction_type", "epsilon")
    table = getattr(scheduler, "alphas_cumprod", None)
    if table is None:
        raise GenuncError(f"{type(scheduler).__name__} has neither an alphas_cumprod table nor "
                          "a flow-matching schedule: genunc cannot express its clean-sample "
                          "prediction")
    table = torch.as_tensor(table, dtype=torch.float64).cpu()
    position = float(t.clamp(0, len(table) - 1))
    low = int(position)
    abar = table[low] if position == low else torch.lerp(
        table[low], table[min(low + 1, len(table) - 1)], torch.tensor(position - low,
                                                                      dtype=torch.float64))
    # the scheduler's own float32 arithmetic: alphas_cumprod is a float32 table there
    abar_t = abar.to(torch.float32).to(dtype) if dtype == torch.float32 else abar
    beta_t = 1 - abar_t
    if kind == "epsilon":
        x0 = (sample - beta_t ** 0.5 * output) / abar_t ** 0.5
    elif kind == "v_prediction":
        x0 = abar_t ** 0.5 * sample - beta_t ** 0.5 * output
    elif kind == "sample":
        x0 = output
    else:
        raise GenuncError(f"unsupported prediction_type {kind!r}")
    if config.get("thresholding", False):
        threshold = scheduler._threshold_sample
        flat = x0.reshape(-1, *sample.shape[1:]) if x0.dim() > sample.dim() else x0
        x0 = threshold(flat).reshape(x0.shape)
    elif config.get("clip_sample", False):
        limit = float(config.get("clip_sample_range", 1.0))
        x0 = x0.clamp(-limit, limit)
    return x0
