"""``genunc rl`` configurations: every choice DUAL makes is a key here, with its default.

Loaded by the same loader as job configs (:func:`genunc.config.load_config`: YAML, then
``--set section.key=value``; unknown keys and bad values are errors naming what is allowed),
and written next to every result, so a result says how it was made.  Where the DUAL paper's
details are not public the default is a documented choice (docs/guides/rl.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genunc.config import Rule, load_config
from genunc.errors import ConfigError

DEFAULTS: dict[str, Any] = {
    "env": {
        "id": "Hopper-v5",  # any gymnasium id with a Box action space
        # a dynamics shift of the online environment, e.g. "body_mass.torso=1.5",
        # "friction=0.5" (MuJoCo) or "attributes.m=1.5" (classic control); comma-separated
        "shift": None,
    },
    "data": {
        "path": "zoo:rl/hopper-medium",  # an OfflineDataset .npz (genunc zoo train rl-dataset)
        "held_out": 0.1,  # fraction of episodes kept out of training: the detector's calibration
        "max_transitions": None,  # use the first n training transitions (null: all)
    },
    "seed": 0,
    "out": "outputs/rl/hopper",
    "agent": {
        "width": 256, "depth": 3,
        "actor_steps": 5,  # the actor's chain: few steps, it acts at every environment step
        "behaviour_steps": 20,  # the behaviour model the actor is distilled from
        "transition_steps": 10,
    },
    "offline": {
        "behaviour_updates": 20000, "transition_updates": 20000,
        # learner iterations: the critics update at each, the actor at every actor_every-th
        # (TD3's delayed policy updates: the actor's chain backpropagation is the costly part)
        "actor_updates": 30000, "actor_every": 2,
        "batch_size": 256, "lr": 3e-4, "gamma": 0.99, "tau": 0.005,
        "eta": 1.0,  # weight of the actor's Q term (Diffusion-QL's eta)
        # fraction of the actor's imitation targets that are behaviour-model samples (the rest
        # are dataset actions): 1.0 distils the behaviour model, 0.0 is plain Diffusion-QL
        "distill": 1.0,
    },
    "posterior": {
        "structure": "diag",
        "prior_precision": "marglik",
        "max_samples": 20000,  # (action, state) pairs the Laplace fit sees
        "refresh_every": 5000,  # online steps between refits on offline + online data (0: never)
    },
    "online": {
        "steps": 25000,
        "candidates": 10,  # N actions proposed per decision
        "num_draws": 8,  # M head draws for the epistemic score
        # uncertainty (Q + beta u), none (beta = 0), noise (a random bonus of u's scale)
        "bonus": "uncertainty",
        # u: action_variance (the M+1 draws' chains) or action_variance_x0 (the MAP chain's
        # last-step clean predictions under the M heads: one chain, 1.0-1.4x plain generation)
        "score": "action_variance",
        "beta": 1.0, "beta_final": 0.0,
        "anneal_steps": 25000,  # beta goes linearly from beta to beta_final over these steps
        "offline_fraction": 0.5,  # of each minibatch while no shift is detected
        "update_every": 1, "updates_per_step": 1,
        "start_updates": 1000,  # online steps before the first update
        "eval_every": 5000, "eval_episodes": 5,
        # evaluation episodes' seeds start here: disjoint from training and tuning seeds
        "eval_seed_offset": 1_000_000,
    },
    "detector": {
        "enabled": True,
        "level": 0.05,  # per-transition false-alarm rate on offline-world transitions
        "samples": 16,  # transition-model draws per observed transition
        "window": 200, "confidence": 0.001,
        # only transitions whose (s, a) lies within this quantile of held-out offline pairs'
        # distance to the training pairs are judged (outside, model error is not evidence)
        "support_level": 0.95, "support_size": 20000,
        # Mondrian calibration: one threshold per bin of support distance (1: one pooled threshold)
        "bins": 1,
        "beta_boost": 2.0,  # beta is multiplied by this once the detector fires
        "offline_fraction": 0.1,  # and offline data's share of each minibatch drops to this
    },
}

_COUNT, _SEED, _FRACTION = Rule(int, minimum=1), Rule(int, minimum=0), Rule(float, minimum=0, maximum=1)
_POSITIVE = Rule(float, positive=True)
RULES: dict[str, Rule] = {
    "env.id": Rule(str), "env.shift": Rule(str, nullable=True),
    "data.path": Rule(str), "data.held_out": Rule(float, positive=True, maximum=0.5),
    "data.max_transitions": Rule(int, minimum=1, nullable=True),
    "seed": _SEED, "out": Rule(str),
    **{f"agent.{k}": _COUNT for k in ("width", "depth", "actor_steps", "behaviour_steps",
                                       "transition_steps")},
    **{f"offline.{k}": _SEED for k in ("behaviour_updates", "transition_updates", "actor_updates")},
    "offline.actor_every": _COUNT, "offline.batch_size": _COUNT, "offline.lr": _POSITIVE,
    "offline.gamma": Rule(float, minimum=0, maximum=1), "offline.tau": _FRACTION,
    "offline.eta": Rule(float, minimum=0), "offline.distill": _FRACTION,
    "posterior.structure": Rule(str, choices=("diag", "kron", "full")),
    "posterior.prior_precision": Rule(float, positive=True, words=("marglik",)),
    "posterior.max_samples": _COUNT, "posterior.refresh_every": _SEED,
    "online.steps": _SEED, "online.candidates": _COUNT, "online.num_draws": Rule(int, minimum=2),
    "online.bonus": Rule(str, choices=("uncertainty", "none", "noise")),
    "online.score": Rule(str, choices=("action_variance", "action_variance_x0")),
    "online.beta": Rule(float, minimum=0), "online.beta_final": Rule(float, minimum=0),
    "online.anneal_steps": _COUNT, "online.offline_fraction": _FRACTION,
    "online.update_every": _COUNT, "online.updates_per_step": _COUNT,
    "online.start_updates": _SEED, "online.eval_every": _COUNT, "online.eval_episodes": _COUNT,
    "online.eval_seed_offset": _SEED,
    "detector.enabled": Rule(bool), "detector.level": Rule(float, positive=True, maximum=0.5),
    "detector.samples": _COUNT, "detector.window": _COUNT,
    "detector.support_level": Rule(float, positive=True, maximum=1), "detector.support_size": _COUNT,
    "detector.bins": _COUNT,
    "detector.confidence": Rule(float, positive=True, maximum=0.5),
    "detector.beta_boost": Rule(float, minimum=0), "detector.offline_fraction": _FRACTION,
}


def load_rl_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``--set`` overrides, checked."""
    return load_config(path, overrides, defaults=DEFAULTS, rules=RULES)


def parse_shift(text: str | None) -> dict[str, Any] | None:
    """``"body_mass.torso=1.5,friction=0.5"`` -> ``{"body_mass": {"torso": 1.5}, "friction": 0.5}``."""
    if not text:
        return None
    shift: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not sep or factor is None or not key:
            raise ConfigError(f"env.shift part {part!r} must look like name=factor or "
                              f"group.name=factor (e.g. body_mass.torso=1.5)")
        group, _, name = key.partition(".")
        if name:
            shift.setdefault(group, {})[name] = factor
        else:
            shift[group] = factor
    return shift

