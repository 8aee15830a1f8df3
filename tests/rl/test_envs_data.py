"""genunc.rl's environments (shifted dynamics, seeded evaluation, normalised return) and offline
datasets (compact files, episode splits), and the recipe that makes the shipped datasets."""

import json
import re

import numpy as np
import pytest

from genunc.errors import ConfigError, GenuncError, MissingFileError
from genunc.rl.data import OfflineDataset, shipped, shipped_dir
from genunc.rl.envs import episode_seeds, evaluate_policy, make_env, normalised_return

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")


# ------------------------------------------------------------------------------- envs
def test_a_pendulum_attribute_shift_changes_the_dynamics():
    plain, heavy = make_env("Pendulum-v1"), make_env("Pendulum-v1", shift={"attributes": {"m": 1.5}})
    assert plain.unwrapped.m == 1.0 and heavy.unwrapped.m == 1.5
    after = []
    for env in (plain, heavy):
        env.reset(seed=3)
        after.append(env.step(np.array([1.0], np.float32))[0])
    assert not np.allclose(after[0], after[1])


def test_hopper_mass_and_friction_shifts():
    plain = make_env("Hopper-v5").unwrapped.model
    env = make_env("Hopper-v5", shift={"body_mass": {"torso": 1.5}, "friction": 0.5})
    model = env.unwrapped.model
    torso = [model.body(i).name for i in range(model.nbody)].index("torso")
    assert model.body_mass[torso] == pytest.approx(1.5 * plain.body_mass[torso])
    others = [i for i in range(model.nbody) if i != torso]
    np.testing.assert_array_equal(model.body_mass[others], plain.body_mass[others])
    np.testing.assert_allclose(model.geom_friction[:, 0], 0.5 * plain.geom_friction[:, 0])
    np.testing.assert_array_equal(model.geom_friction[:, 1:], plain.geom_friction[:, 1:])


@pytest.mark.parametrize("env_id, shift, names", [
    ("Pendulum-v1", {"mass": 1.5}, ["attributes", "body_mass", "friction"]),
    ("Hopper-v5", {"body_mass": {"head": 2.0}}, ["torso", "thigh", "leg", "foot"]),
    ("Pendulum-v1", {"attributes": {"mass": 2.0}}, ["m", "l", "g"]),
    ("Pendulum-v1", {"body_mass": {"torso": 2.0}}, ["attributes", "m"]),
    ("Hopper-v5", {"friction": -1}, ["positive"]),
])
def test_a_bad_shift_is_a_one_line_error_naming_what_exists(env_id, shift, names):
    with pytest.raises(ConfigError) as err:
        make_env(env_id, shift=shift)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in names), message


def _linear(obs):  # a deterministic policy for Pendulum
    return np.clip(-obs[:, 2:3] - 2 * obs[:, 1:2], -2, 2)


def test_evaluation_is_deterministic_given_the_seeds():
    seeds = episode_seeds(0, 3)
    first = evaluate_policy(_linear, "Pendulum-v1", seeds)
    assert first.shape == (3,) and first.dtype == np.float64
    np.testing.assert_array_equal(first, evaluate_policy(_linear, "Pendulum-v1", seeds))
    # each episode is its own: alone or in a batch, in any order, the same return
    np.testing.assert_array_equal(evaluate_policy(_linear, "Pendulum-v1", seeds[::-1]), first[::-1])
    assert evaluate_policy(_linear, "Pendulum-v1", seeds[1:2])[0] == first[1]
    assert not np.allclose(evaluate_policy(_linear, "Pendulum-v1", episode_seeds(1, 3)), first)
    shifted = evaluate_policy(_linear, "Pendulum-v1", seeds, shift={"attributes": {"m": 2.0}})
    assert not np.allclose(shifted, first)


def test_episode_seeds_are_streams():
    assert episode_seeds(0, 5)[:2] == episode_seeds(0, 2)
    assert episode_seeds(0, 3, start=2) == episode_seeds(0, 5)[2:]
    assert not set(episode_seeds(0, 5)) & set(episode_seeds(0, 5, stream=1))
    assert episode_seeds(0, 5) != episode_seeds(1, 5)


def test_normalised_return():
    assert normalised_return(-1200.0, -1200.0, -150.0) == 0.0
    assert normalised_return(-150.0, -1200.0, -150.0) == 100.0
    np.testing.assert_allclose(normalised_return(np.array([10.0, 55.0]), 10.0, 100.0), [0.0, 50.0])
    with pytest.raises(ConfigError):
        normalised_return(1.0, 5.0, 5.0)


# ------------------------------------------------------------------------------- datasets
def _dataset(lengths=(5, 7, 3, 6), seed=0, obs_dim=3, act_dim=2):
    """Episodes of a random walk: next observation = the next row's within an episode."""
    rng = np.random.default_rng(seed)
    parts = {k: [] for k in ("obs", "act", "rew", "next", "term", "trunc")}
    for e, n in enumerate(lengths):
        states = rng.normal(size=(n + 1, obs_dim)) * 5
        parts["obs"].append(states[:-1])
        parts["next"].append(states[1:])
        parts["act"].append(rng.uniform(-2, 2, (n, act_dim)))
        parts["rew"].append(rng.normal(size=n))
        end = np.zeros(n, bool)
        end[-1] = True
        parts["term"].append(end & (e % 2 == 0))
        parts["trunc"].append(end & (e % 2 == 1))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return OfflineDataset(cat["obs"], cat["act"], cat["rew"], cat["next"], cat["term"], cat["trunc"],
                          metadata={"env_id": "Toy-v0", "kind": "medium", "random_return": -10.0,
                                    "best_return": 30.0, "action_low": [-2.0, -2.0],
                                    "action_high": [2.0, 2.0], "seed": seed})


def test_save_load_round_trip_within_float16(tmp_path):
    data = _dataset()
    path = data.save(tmp_path / "d.npz")
    back = OfflineDataset.load(path)
    assert len(back) == len(data) and back.metadata == data.metadata
    for name in ("observations", "actions", "rewards", "next_observations"):
        got, want = getattr(back, name), getattr(data, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(back.terminals, data.terminals)
    np.testing.assert_array_equal(back.timeouts, data.timeouts)
    np.testing.assert_array_equal(back.action_high, [2.0, 2.0])
    assert [len(e) for e in back.episodes()] == [5, 7, 3, 6]
    with np.load(path) as npz:  # next observations stored only at episode ends
        assert npz["next_observations"].shape == (4, 3) and npz["observations"].dtype == np.float16
    assert not list(tmp_path.glob(".*tmp")), "written atomically, nothing left behind"


def test_load_refuses_what_is_not_a_dataset(tmp_path):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "text.npz").write_text("not a zip")
    np.save(tmp_path / "array.npy", np.zeros(3))
    for name in ("other.npz", "text.npz", "array.npy"):
        with pytest.raises(GenuncError, match="is not an OfflineDataset file") as err:
            OfflineDataset.load(tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(MissingFileError):
        OfflineDataset.load(tmp_path / "absent.npz")
    with pytest.raises(GenuncError, match="zoo:rl/<env>-<kind>"):
        OfflineDataset.load("zoo:nothing")


def test_split_is_disjoint_by_episode_and_seeded():
    data = _dataset(lengths=tuple(range(2, 22)))
    kept, held = data.split(0.25, seed=0)
    assert len(kept) + len(held) == len(data)
    assert len(held.episode_slices()) == 5 and len(kept.episode_slices()) == 15
    rows = lambda part: {tuple(r) for r in part.observations}  # noqa: E731 (states are distinct)
    assert not rows(kept) & rows(held) and rows(kept) | rows(held) == rows(data)
    whole = {tuple(map(tuple, e.observations)) for e in data.episodes()}
    assert all(tuple(map(tuple, e.observations)) in whole for e in held.episodes())
    again = data.split(0.25, seed=0)[1]
    np.testing.assert_array_equal(again.observations, held.observations)
    assert rows(data.split(0.25, seed=1)[1]) != rows(held)
    assert held.metadata["split"]["part"] == "held_out"
    with pytest.raises(GenuncError):
        data.split(1.0, seed=0)


def test_a_dataset_normalises_with_its_recorded_returns():
    data = _dataset()
    assert data.normalise_return(10.0) == pytest.approx(50.0)
    data.metadata.pop("best_return")
    with pytest.raises(GenuncError, match="best_return"):
        data.normalise_return(10.0)


def test_a_trailing_cut_episode_counts():
    data = _dataset()
    data.timeouts[-1] = False  # the data ends mid-episode
    assert len(data.episode_slices()) == 4 and data.episode_slices()[-1].stop == len(data)


# ------------------------------------------------------------------------------- shipped
def test_the_pendulum_datasets_are_shipped():
    assert {"zoo:rl/pendulum-medium", "zoo:rl/pendulum-medium-replay"} <= set(shipped())
    assert all((shipped_dir("Pendulum-v1") / f"{kind}.npz").stat().st_size < 1_100_000
               for kind in ("medium", "medium-replay"))


@pytest.mark.parametrize("name", shipped())
def test_every_shipped_dataset_says_how_it_was_made(name):
    data = OfflineDataset.load(name)
    meta = data.metadata
    path = shipped_dir(meta["env_id"]) / f"{meta['kind']}.npz"
    assert name == f"zoo:rl/{path.parent.name.removeprefix('rl_')}-{meta['kind']}"
    assert path.stat().st_size < 6_000_000, "a few MB at most"
    assert meta["command"].startswith(f"genunc zoo train rl-dataset --env {meta['env_id']} ")
    assert meta["random_return"] < meta["medium_return"] < meta["best_return"]
    assert 100 / 3 - 1e-9 <= data.normalise_return(meta["medium_return"]) <= 50 or \
        not meta["medium"]["in_window"]
    assert np.all(data.actions >= data.action_low) and np.all(data.actions <= data.action_high)
    env = make_env(meta["env_id"])
    assert data.obs_dim == env.observation_space.shape[0]
    np.testing.assert_array_equal(data.action_high, env.action_space.high)
    report = json.loads((path.parent / "training.json").read_text())
    assert report["command"] == meta["command"]


# ------------------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_the_recipe_end_to_end_on_pendulum(tmp_path, capsys):
    """SAC -> checkpoints -> random return -> medium checkpoint -> both datasets; a run stopped
    at 1500 steps continues from its checkpoint, and a rerun does no stage twice.  A 64-wide SAC
    (lr 1e-3) learns Pendulum in 3000 steps at a third of the default one's cost."""
    pytest.importorskip("stable_baselines3")
    from genunc.cli import main

    out = tmp_path / "run"
    args = ["zoo", "train", "rl-dataset", "--env", "Pendulum-v1", "--eval-every", "500",
            "--eval-episodes", "2", "--transitions", "500", "--learning-starts", "500",
            "--sac-width", "64", "--sac-lr", "1e-3", "--out", str(out)]
    # 1500 steps may not beat the random policy yet (then no dataset, exit 2): checkpoints stay
    assert main([*args, "--steps", "1500"]) in (0, 2)
    assert (out / "sac" / "step_00001500.zip").is_file()
    assert main([*args, "--steps", "3000"]) == 0
    report = json.loads((out / "training.json").read_text())
    assert [e["step"] for e in report["evaluations"]] == list(range(500, 3001, 500))
    assert report["resumed_at"] == [1500]
    assert report["best_return"] > report["random_return"]
    assert report["sac"]["net_arch"] == [64, 64] and report["sac"]["learning_rate"] == 1e-3
    assert report["command"].endswith("--seed 0 --sac-width 64 --sac-lr 0.001")
    medium = OfflineDataset.load(out / "medium.npz")
    replay = OfflineDataset.load(out / "medium-replay.npz")
    assert len(medium) == 500 and medium.timeouts[-1]
    assert len(replay) == report["medium"]["step"]
    lengths = [len(e) for e in replay.episodes()]  # Pendulum's episodes: 200 steps
    assert max(lengths) == 200 and sum(lengths) == len(replay)
    if len(replay) > 1500:  # the episode the resumption cut ends there, as a timeout
        assert replay.timeouts[1499] and 1500 in np.cumsum(lengths)
    for data in (medium, replay):
        assert data.metadata["command"] == report["command"] and data.metadata["seed"] == 0
        assert data.metadata["medium"] == report["medium"]
        assert np.all(np.abs(data.actions) <= 2.0)
    # within an episode the replay's next observation is the next row's observation
    ends = replay.terminals | replay.timeouts
    np.testing.assert_array_equal(replay.next_observations[:-1][~ends[:-1]],
                                  replay.observations[1:][~ends[:-1]])
    before = (out / "medium.npz").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--steps", "3000"]) == 0
    log = capsys.readouterr().out
    assert log.count("is done") == 2 and not re.search(r"checkpoint \d+:", log)
    assert (out / "medium.npz").stat().st_mtime_ns == before
