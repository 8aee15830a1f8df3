"""Reinforcement learning: DUAL, a diffusion actor with Laplace uncertainty for offline-to-online
RL, and what it runs on.

* :mod:`genunc.rl.envs`: any gymnasium env, optionally with shifted dynamics; episode seeds,
  policy evaluation and the normalised return;
* :mod:`genunc.rl.data`: offline datasets (:class:`~genunc.rl.data.OfflineDataset`), their
  compact files and the shipped ones (``zoo:rl/<env>-<kind>``), made by
  ``genunc zoo train rl-dataset``;
* DUAL itself: :mod:`~genunc.rl.networks` (the conditional vector denoiser, twin critics),
  :mod:`~genunc.rl.diffusion` (few-step chains in the scheduler's arithmetic),
  :mod:`~genunc.rl.agent`, :mod:`~genunc.rl.learner`, :mod:`~genunc.rl.offline`,
  :mod:`~genunc.rl.online`, :mod:`~genunc.rl.detector` (the shift detector),
  :mod:`~genunc.rl.config` and :mod:`~genunc.rl.run` (``genunc rl offline|online|evaluate``).
  The actor's uncertainty is genunc's own: its head posterior and candidates come from
  :class:`~genunc.pipelines.vector.VectorUncertaintyPipeline`.

gymnasium (the ``rl`` extra) is imported only when an environment is made, and these names
when first used, so ``genunc --help`` (which adds ``genunc rl``) loads neither torch nor
gymnasium.
"""

from importlib import import_module
from typing import Any

_WHERE = {"OfflineDataset": "data", "evaluate_policy": "envs", "make_env": "envs",
          "normalised_return": "envs"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
