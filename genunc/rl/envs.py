"""Environments for :mod:`genunc.rl`: any gymnasium id, optionally with shifted dynamics.

Nothing here knows a particular task.  A *shift* changes the dynamics of a freshly made
environment, which is how the online phase meets a world that differs from the offline data's:

* ``{"body_mass": {"torso": 1.5}}``: MuJoCo envs; multiplies ``model.body_mass`` of the named
  bodies (names as the model's XML spells them; the rotational inertia is left as it is, the
  usual reading of "torso mass x1.5" in the robust-RL literature);
* ``{"friction": 0.5}``: MuJoCo envs; multiplies the sliding friction of every geom
  (``model.geom_friction[:, 0]``);
* ``{"attributes": {"m": 1.5}}``: any env; multiplies numeric attributes of ``env.unwrapped``
  (classic control such as ``Pendulum-v1``: ``m``, ``l``, ``g``, ...).

A key, body or attribute that does not exist is a one-line :class:`~genunc.errors.ConfigError`
listing the ones that do.

Also the bookkeeping every RL result needs: seeds for episodes (:func:`episode_seeds`, one
named random stream), evaluation of a policy on given seeds (:func:`evaluate_policy`) and the
D4RL-style normalised return (:func:`normalised_return`).

gymnasium is imported when an environment is made, so ``genunc.rl`` imports without the ``rl``
extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from genunc.errors import ConfigError
from genunc.streams import seed_sequence

if TYPE_CHECKING:
    import gymnasium

#: the kinds of shift :func:`make_env` applies
SHIFT_KEYS = ("attributes", "body_mass", "friction")

#: a policy for evaluation: a batch of observations ``(B, obs_dim)`` -> actions ``(B, act_dim)``
Policy = Callable[[np.ndarray], Any]


def make_env(env_id: str, *, shift: Mapping[str, Any] | None = None,
             seed: int | None = None) -> gymnasium.Env:
    """``gymnasium.make(env_id)`` with `shift` applied to its dynamics (see the module doc).

    With `seed`, the environment is reset once with it and its action space seeded, so that
    later ``reset()`` calls without a seed continue a reproducible stream.
    """
    import gymnasium

    _check_shift_keys(shift)
    try:
        env = gymnasium.make(env_id)
    except gymnasium.error.Error as err:
        raise ConfigError(f"cannot make env {env_id!r}: {str(err).splitlines()[0]}") from None
    try:
        apply_shift(env, shift)
    except BaseException:
        env.close()
        raise
    if seed is not None:
        env.reset(seed=int(seed))
        env.action_space.seed(int(seed))
    return env


def apply_shift(env: gymnasium.Env, shift: Mapping[str, Any] | None) -> dict[str, list[float]]:
    """Apply `shift` to `env` in place; returns ``{"body_mass.torso": [before, after], ...}``."""
    _check_shift_keys(shift)
    changed: dict[str, list[float]] = {}
    if not shift:
        return changed
    base = env.unwrapped
    name = env.spec.id if env.spec is not None else type(base).__name__
    for key, value in shift.items():
        if key == "attributes":
            for attr, factor in _factors(value, key).items():
                numeric = sorted(k for k, v in vars(base).items() if _is_number(v))
                if not _is_number(getattr(base, attr, None)):
                    raise ConfigError(f"{name} has no numeric attribute {attr!r} to shift; "
                                      f"it has: {', '.join(numeric) or 'none'}")
                before = getattr(base, attr)
                setattr(base, attr, float(before) * factor)
                changed[f"attributes.{attr}"] = [float(before), float(getattr(base, attr))]
        elif key == "body_mass":
            import mujoco

            model = _mujoco_model(base, name, key)
            bodies = [model.body(i).name for i in range(model.nbody)]
            for body, factor in _factors(value, key).items():
                index = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, str(body))
                if index < 0:
                    raise ConfigError(f"{name} has no body {body!r}; its bodies: {', '.join(bodies)}")
                before = float(model.body_mass[index])
                model.body_mass[index] = before * factor
                changed[f"body_mass.{body}"] = [before, float(model.body_mass[index])]
        else:  # friction
            model = _mujoco_model(base, name, key)
            factor = _factor(value, key)
            before = model.geom_friction[:, 0].copy()
            model.geom_friction[:, 0] = before * factor
            changed["friction"] = [float(before.mean()), float(model.geom_friction[:, 0].mean())]
    return changed


def _check_shift_keys(shift: Mapping[str, Any] | None) -> None:
    if shift is None:
        return
    if not isinstance(shift, Mapping):
        raise ConfigError(f"a shift is a mapping such as {{'friction': 0.5}}, got {shift!r}")
    unknown = sorted(set(shift) - set(SHIFT_KEYS))
    if unknown:
        raise ConfigError(f"unknown shift key(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(SHIFT_KEYS)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _factor(value: Any, what: str) -> float:
    if not _is_number(value) or not math.isfinite(float(value)) or float(value) <= 0:
        raise ConfigError(f"shift {what}: a factor is a positive finite number, got {value!r}")
    return float(value)


def _factors(value: Any, what: str) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value:
        raise ConfigError(f"shift {what} maps names to factors, e.g. {{{what!r}: {{'name': 1.5}}}}, "
                          f"got {value!r}")
    return {str(k): _factor(v, f"{what}.{k}") for k, v in value.items()}


def _mujoco_model(base: Any, name: str, key: str) -> Any:
    model = getattr(base, "model", None)
    if model is None or not hasattr(model, "body_mass"):
        numeric = sorted(k for k, v in vars(base).items() if _is_number(v))
        raise ConfigError(f"shift {key!r} needs a MuJoCo env and {name} is not one; shift its "
                          f"attributes instead ({{'attributes': {{...}}}}): {', '.join(numeric)}")
    return model


def action_bounds(env: gymnasium.Env) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) of a Box action space, float32; any other space is an error."""
    space = env.action_space
    if not hasattr(space, "low") or not hasattr(space, "high"):
        raise ConfigError(f"genunc.rl needs a Box action space, got {space}")
    return np.asarray(space.low, np.float32), np.asarray(space.high, np.float32)


def episode_seeds(seed: int, n: int, *, stream: int = 0, start: int = 0) -> list[int]:
    """Reset seeds of episodes ``start .. start+n-1``: episode ``i``'s from the
    ``(seed, "env_reset", stream, i)`` stream (one `stream` per role: evaluation, data
    collection, ...), so episode ``i`` gets the same seed however many are asked for."""
    return [int(seed_sequence(seed, "env_reset", stream, i).generate_state(1, np.uint32)[0] >> 1)
            for i in range(int(start), int(start) + int(n))]


def normalised_return(R: Any, random_return: float, best_return: float) -> Any:
    """``100 * (R - R_random) / (R_best - R_random)`` (D4RL's normalised score): 0 is the
    random policy, 100 the best behaviour checkpoint.  Works elementwise on arrays."""
    span = float(best_return) - float(random_return)
    if not math.isfinite(span) or span == 0:
        raise ConfigError(f"normalised return needs best_return != random_return, got "
                          f"{best_return!r} and {random_return!r}")
    value = 100.0 * (np.asarray(R, np.float64) - float(random_return)) / span
    return float(value) if value.ndim == 0 else value


def evaluate_policy(policy: Policy, env_id: str, seeds: Sequence[int], *,
                    shift: Mapping[str, Any] | None = None, clip: bool = True,
                    max_steps: int | None = None) -> np.ndarray:
    """Per-episode returns of `policy` on ``len(seeds)`` episodes, episode ``i`` reset with
    ``seeds[i]``; float64 array in the order of `seeds`.

    The episodes run in lockstep, one environment each, so `policy` is called once per step
    with the observations of every episode still running, ``(B, obs_dim)`` float32, and returns
    ``(B, act_dim)`` actions in the env's units (clipped to the action bounds unless
    ``clip=False``).  Given the seeds, a deterministic policy gives the same returns every time.
    `max_steps` (optional) ends episodes early, beyond the env's own time limit.
    """
    envs = [make_env(env_id, shift=shift) for _ in seeds]
    try:
        low, high = action_bounds(envs[0]) if envs else (None, None)
        obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
        for env, s in zip(envs, seeds):
            env.action_space.seed(int(s))
        returns = np.zeros(len(envs), np.float64)
        running = list(range(len(envs)))
        steps = 0
        while running and (max_steps is None or steps < max_steps):
            batch = np.stack([np.asarray(obs[i], np.float32) for i in running])
            actions = np.asarray(policy(batch), np.float32).reshape(len(running), -1)
            if actions.shape[1] != low.shape[0]:
                raise ConfigError(f"the policy returned actions of shape {actions.shape}; "
                                  f"{env_id} takes ({len(running)}, {low.shape[0]})")
            if clip:
                actions = np.clip(actions, low, high)
            still = []
            for row, i in enumerate(running):
                obs[i], reward, terminated, truncated, _ = envs[i].step(actions[row])
                returns[i] += float(reward)
                if not (terminated or truncated):
                    still.append(i)
            running = still
            steps += 1
        return returns
    finally:
        for env in envs:
            env.close()
