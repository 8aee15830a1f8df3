"""Reinforcement learning: DUAL, a diffusion actor with Laplace uncertainty for offline-to-online
RL, and what it runs on.

* :mod:`genunc.rl.envs`: any gymnasium env, optionally with shifted dynamics; episode seeds,
  policy evaluation and the normalised return;
* :mod:`genunc.rl.data`: offline datasets (:class:`~genunc.rl.data.OfflineDataset`), their
  compact files and the shipped ones (``zoo:rl/<env>-<kind>``), made by
  ``genunc zoo train rl-dataset``.

gymnasium (the ``rl`` extra) is imported only when an environment is made.
"""

from genunc.rl.data import OfflineDataset
from genunc.rl.envs import evaluate_policy, make_env, normalised_return

__all__ = ["OfflineDataset", "evaluate_policy", "make_env", "normalised_return"]
