"""DUAL end to end on Pendulum-v1: offline -> online for a few hundred steps, reproducibly."""

import json

import numpy as np
import pytest

pytest.importorskip("gymnasium")

from genunc.cli import main  # noqa: E402
from genunc.rl import run  # noqa: E402
from genunc.rl.config import load_rl_config  # noqa: E402
from genunc.rl.data import OfflineDataset  # noqa: E402
from genunc.rl.envs import make_env  # noqa: E402


def _noisy_pd_dataset(episodes: int, seed: int) -> OfflineDataset:
    """Transitions of a noisy PD controller (a cheap behaviour policy for a smoke test)."""
    env = make_env("Pendulum-v1")
    rng = np.random.default_rng(seed)
    names = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    rows = {k: [] for k in names}
    for e in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + e)
        done = False
        while not done:
            theta = np.arctan2(obs[1], obs[0])
            action = np.clip(-(8 * theta + 1.5 * obs[2]) + rng.normal(0, 1.0), -2, 2)
            nxt, reward, terminated, truncated, _ = env.step(np.array([action], np.float32))
            for k, v in zip(names, (obs, [action], reward, nxt, terminated, truncated), strict=True):
                rows[k].append(v)
            obs, done = nxt, terminated or truncated
    return OfflineDataset(**{k: np.array(v) for k, v in rows.items()}, metadata={
        "env_id": "Pendulum-v1", "kind": "test", "random_return": -1200.0, "best_return": -150.0,
        "action_low": [-2.0], "action_high": [2.0]})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dual")
    _noisy_pd_dataset(20, 0).save(root / "data.npz")
    return root, [
        f"data.path={root / 'data.npz'}", f"out={root / 'runs'}", "agent.width=32", "agent.depth=2",
        "offline.behaviour_updates=100", "offline.transition_updates=100",
        "offline.actor_updates=100", "posterior.max_samples=1000", "posterior.refresh_every=100",
        "online.steps=200", "online.start_updates=50", "online.eval_every=100",
        "online.eval_episodes=1", "detector.window=50"]


def test_offline_then_online_writes_a_reproducible_curve(tiny):
    root, sets = tiny
    config = load_rl_config("configs/pendulum.yaml", sets)
    path = run.online(config, progress=False)  # trains the offline agent first
    record = json.loads(path.read_text())
    assert [c["step"] for c in record["curve"]] == [0, 100, 200]
    assert all(np.isfinite(c["normalised"]) for c in record["curve"])
    assert record["variant"] == "uncertainty" and record["config"] == config
    assert set(record["detector"]) >= {"shifted_at", "alarms", "judged", "threshold"}
    assert record["bonus_stats"] and record["bonus_stats"][0]["u_mean"] > 0  # u was computed
    offline = json.loads((root / "runs" / "seed0" / "agent" / run.OFFLINE_FILE).read_text())
    assert offline["posterior"]["prior_precision"] > 0 and offline["detector"]["threshold"] > 0

    again = run.online(config, progress=False, force=True)  # same seed: the same returns
    assert [c["returns"] for c in json.loads(again.read_text())["curve"]] == \
        [c["returns"] for c in record["curve"]]
    rows = run.summarise(root / "runs")
    assert [r["variant"] for r in rows] == ["uncertainty"] and rows[0]["seeds"] == 1


def test_the_control_without_uncertainty_and_the_cli(tiny, capsys):
    root, sets = tiny
    args = ["rl", "online", "-c", "configs/pendulum.yaml", "--quiet"]
    for item in [*sets, "online.bonus=none"]:
        args += ["--set", item]
    assert main(args) == 0
    assert "seed 0 none: normalised return by step 0:" in capsys.readouterr().out
    record = json.loads((root / "runs" / "seed0" / "online" / "none.json").read_text())
    assert record["bonus_stats"] == []  # beta = 0: no scores computed
    assert main(["rl", "evaluate", "-c", "configs/pendulum.yaml", "--out", str(root / "runs")]) == 0
    printed = capsys.readouterr().out
    assert "| none | 1 |" in printed and "| uncertainty - none | 1 |" in printed  # paired per seed


def test_the_one_chain_score_as_u_is_its_own_variant(tiny, capsys):
    """online.score=action_variance_x0: the same offline agent, u from the MAP chain alone; the
    run is named uncertainty-x0, computes its bonus, and is paired with the chained u."""
    root, sets = tiny
    config = load_rl_config("configs/pendulum.yaml", [*sets, "online.score=action_variance_x0"])
    assert run.variant(config) == "uncertainty-x0"
    record = json.loads(run.online(config, progress=False).read_text())
    assert record["variant"] == "uncertainty-x0" and record["bonus_stats"][0]["u_mean"] > 0
    chained = json.loads(run.online(load_rl_config("configs/pendulum.yaml", sets),
                                    progress=False).read_text())
    assert record["bonus_stats"][0]["u_mean"] != chained["bonus_stats"][0]["u_mean"]
    assert main(["rl", "evaluate", "-c", "configs/pendulum.yaml", "--out", str(root / "runs")]) == 0
    assert "| uncertainty-x0 - uncertainty | 1 |" in capsys.readouterr().out
    with pytest.raises(Exception, match="online.score"):
        load_rl_config("configs/pendulum.yaml", ["online.score=semantic"])
