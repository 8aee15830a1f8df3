"""The lab: training recipes for the shipped reference models, and the independent judges.

Nothing here is needed to use genunc: the library (posterior, adapters, sampling, scores,
pipelines, export, filtering, risk, jobs, CLI) never imports it, and loads the shipped models
from :mod:`genunc.zoo` alone.  The library reaches the lab only through registration (entry
points read by :mod:`genunc.plugins`): the ``genunc zoo train`` command (:mod:`genunc.research.cli`)
and the digits judge behind ``quality: zoo:digits_judge`` (:mod:`genunc.research.judges`).

* :mod:`genunc.research.training`: the training skeleton every recipe runs on;
* :mod:`genunc.research.recipes`: one module per reference model (``digits``, ``digits_latent``,
  ``qm9``, ``mdlm`` with ``arith`` and ``order_tasks``, ``policy``: GRPO for the learned
  unmasking policy, and ``rl_dataset``: the SAC behaviour policy and offline RL datasets);
* :mod:`genunc.research.judges`: the independent digits judge, its recipe and its evaluator.
"""
