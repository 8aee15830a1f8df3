"""DUAL's parts: the actor's chain, the shift detector, the config, saving the agent."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genunc.errors import ConfigError
from genunc.rl.agent import DUALAgent, Scales
from genunc.rl.config import load_rl_config, parse_shift
from genunc.rl.detector import DetectorState, ShiftDetector, support_distances
from genunc.rl.diffusion import make_scheduler, reverse_chain
from genunc.rl.networks import DiffusionMLP
from genunc.rl.offline import TRANSITION, held_out_distances, train_denoiser
from genunc.rl.replay import ReplayBuffer, minibatch


@pytest.mark.parametrize("clip", [1.0, None])
def test_the_differentiable_chain_is_the_schedulers_chain(clip):
    torch.manual_seed(1)
    model, scheduler = DiffusionMLP(3, 5, width=32, depth=2), make_scheduler(5, clip=clip)
    cond = torch.randn(4, 5)
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    scheduler.set_timesteps(5)
    with torch.no_grad():
        for t in scheduler.timesteps:  # diffusers draws its step noise from the global generator
            x = scheduler.step(model(x, int(t), cond), t, x).prev_sample
    torch.manual_seed(0)
    noise = torch.stack([torch.randn(4, 3) for _ in range(5)])
    with torch.no_grad():
        torch.testing.assert_close(reverse_chain(model, cond, scheduler, noise), x)


def test_the_few_step_schedule_starts_from_noise():
    abar = make_scheduler(5).alphas_cumprod
    assert abar[-1] < 0.01 and abar[0] > 0.5  # x_T is ~pure noise, the last step nearly clean


def test_conformal_threshold_keeps_the_false_alarm_rate_at_its_level():
    rng = np.random.default_rng(0)
    detector = ShiftDetector(DetectorState(level=0.1, samples=1, window=50, confidence=0.01))
    detector.calibrate(rng.exponential(size=999))
    rates = [detector.alarms(rng.exponential(size=2000)).mean() for _ in range(20)]
    assert abs(np.mean(rates) - 0.1) < 0.01  # (n + 1) quantile: E[rate] = 1 - 900/1000
    # the windowed test: k alarms in 50 where Binomial(50, 0.1) >= k has probability < 1%
    from scipy.stats import binom
    k = detector.fire_count
    assert binom.sf(k - 1, 50, 0.1) < 0.01 <= binom.sf(k - 2, 50, 0.1)
    with pytest.raises(ValueError, match="cannot certify"):
        ShiftDetector(DetectorState(0.01, 1, 10, 0.01)).calibrate(np.ones(50))


def test_binned_calibration_keeps_its_level_when_the_policy_moves_to_the_support_edge():
    """The model errs more far from the data; an online policy visits the support's edge more
    often than held-out offline pairs do.  A pooled threshold then over-alarms on unshifted
    dynamics; one threshold per support-distance bin (Mondrian conformal) keeps the level."""
    rng = np.random.default_rng(0)

    def world(near):  # unshifted dynamics: the model's error grows with the distance to the data
        return rng.exponential(size=len(near)) * (1 + 4 * near), near

    offline_near = rng.uniform(0, 1, 4000)
    level, online_near = 0.05, rng.beta(5, 1, 20000)  # the online policy: mostly at the edge
    pooled = ShiftDetector(DetectorState(level, 1, 50, 0.001, support_level=1.0))
    binned = ShiftDetector(DetectorState(level, 1, 50, 0.001, support_level=1.0, bins=4))
    for detector in (pooled, binned):
        detector.calibrate(*world(offline_near))
    d, near = world(online_near)
    sd = 3 * np.sqrt(level * (1 - level) / len(d))
    assert pooled.alarms(d, near).mean() > level + 10 * sd  # the pooled level does not hold
    assert binned.alarms(d, near).mean() <= level + 3 * sd
    assert len(binned.state.bin_thresholds) == 4 and len(binned.state.bin_edges) == 3
    assert np.all(np.diff(binned.state.bin_thresholds) > 0)  # farther bins tolerate more error
    # a real shift (errors doubled everywhere) still raises alarms in every bin
    assert binned.alarms(2 * d, near).mean() > 3 * level
    restored = ShiftDetector(DetectorState(**binned.state.to_dict()))  # saved with the agent
    np.testing.assert_array_equal(restored.alarms(d, near), binned.alarms(d, near))
    with pytest.raises(ValueError, match="support distances"):
        ShiftDetector(DetectorState(level, 1, 50, 0.001, bins=4)).calibrate(d)
    with pytest.raises(ValueError, match="in bin"):
        ShiftDetector(DetectorState(level, 1, 50, 0.001, support_level=1.0, bins=400)).calibrate(
            *world(offline_near[:1000]))


def _pendulum(n, seed, shift=None):
    from genunc.rl.envs import make_env

    env = make_env("Pendulum-v1", shift=shift)
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for i in range(n):
        action = rng.uniform(-2, 2, 1).astype(np.float32)
        nxt, _, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, nxt))
        obs = env.reset(seed=seed + i + 1)[0] if terminated or truncated else nxt
    o, a, s = map(np.array, zip(*rows, strict=True))
    return SimpleNamespace(observations=o, actions=a, next_observations=s)


def test_shift_detector_false_alarms_at_its_level_and_fires_on_shifted_dynamics():
    pytest.importorskip("gymnasium")
    train, calibration, held_out = _pendulum(20000, 0), _pendulum(1000, 1), _pendulum(4000, 2)
    shifted = _pendulum(1000, 3, shift={"attributes": {"m": 1.5}})
    scales = Scales.fit(train.observations, train.next_observations, np.array([-2.0]), np.array([2.0]))
    agent = DUALAgent(3, 1, scales, width=64, depth=2)
    agent.init_weights(0)
    s, a = scales.state(train.observations), scales.action_to_unit(train.actions)
    train_denoiser(agent.transition, scales.delta(train.observations, train.next_observations),
                   torch.cat([s, a], -1), agent.transition_scheduler, updates=2000, batch_size=256,
                   lr=1e-3, seed=0, phase=TRANSITION, desc="", progress=False)
    level = 0.05
    detector = ShiftDetector(DetectorState(level, samples=16, window=100, confidence=0.001))
    detector.calibrate(held_out_distances(agent, calibration, 16, seed=0))
    rate = detector.alarms(held_out_distances(agent, held_out, 16, seed=0, stream_offset=100)).mean()
    # within the level, allowing 3 binomial standard errors of the 4,000 held-out transitions
    assert rate <= level + 3 * np.sqrt(level * (1 - level) / 4000)
    shifted_d = held_out_distances(agent, shifted, 16, seed=0, stream_offset=200)
    assert detector.alarms(shifted_d).mean() > 5 * level
    fired = [detector.update(shifted_d[i:i + 1]) for i in range(len(shifted_d))]
    assert any(fired)
    quiet = ShiftDetector(detector.state)
    offline_d = held_out_distances(agent, held_out, 16, seed=0, stream_offset=300)
    assert not any(quiet.update(offline_d[i:i + 1]) for i in range(1000))


def test_transitions_outside_the_offline_support_are_not_judged():
    rng = np.random.default_rng(0)
    support = torch.as_tensor(rng.normal(size=(2000, 3)), dtype=torch.float32)
    state, action = support[:500, :2] + 0.01, support[:500, 2:]
    detector = ShiftDetector(DetectorState(0.05, 1, 20, 0.001, support_level=0.9), support=support)
    held = support_distances(support, torch.as_tensor(rng.normal(size=(500, 2)), dtype=torch.float32),
                             torch.as_tensor(rng.normal(size=(500, 1)), dtype=torch.float32))
    detector.calibrate(rng.exponential(size=500), held)
    assert detector.state.support_threshold == pytest.approx(np.quantile(held, 0.9))
    near = support_distances(support, state, action)
    far = support_distances(support, state + 10, action)
    assert detector.in_support(near).all() and not detector.in_support(far).any()
    huge = np.full(500, 1e6)  # model errors far from the data: no alarm, nothing counted
    assert not detector.alarms(huge, far).any() and not detector.update(huge, far)
    assert len(detector.recent) == 0
    assert detector.alarms(huge, near).all() and detector.update(huge[:20], near[:20])


@pytest.mark.parametrize("name", ["hopper", "pendulum"])
def test_shipped_rl_configs_load_and_name_shipped_datasets(name):
    from genunc.rl.data import shipped

    config = load_rl_config(f"configs/{name}.yaml")
    assert config["env"]["id"].startswith(name.capitalize())
    assert config["data"]["path"] in shipped()


def test_config_rejects_bad_values_and_parses_shifts():
    config = load_rl_config("configs/pendulum.yaml", ["env.shift=attributes.m=1.5"])
    assert parse_shift(config["env"]["shift"]) == {"attributes": {"m": 1.5}}
    assert parse_shift("body_mass.torso=1.5,friction=0.5") == {"body_mass": {"torso": 1.5},
                                                              "friction": 0.5}
    with pytest.raises(ConfigError, match="online.bonus"):
        load_rl_config("configs/pendulum.yaml", ["online.bonus=more"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_rl_config("configs/pendulum.yaml", ["online.betta=1"])
    with pytest.raises(ConfigError, match="name=factor"):
        parse_shift("body_mass.torso")


def test_agent_save_load_round_trip(tmp_path):
    scales = Scales([0.0] * 3, [1.0] * 3, [-2.0], [2.0], [0.0] * 3, [1.0] * 3)
    agent = DUALAgent(3, 1, scales, width=16, depth=1)
    agent.init_weights(3)
    agent.save(tmp_path)
    loaded, _ = DUALAgent.load(tmp_path)
    x = torch.randn(4, 3)
    for name in DUALAgent.NETWORKS:
        for p, q in zip(getattr(agent, name).parameters(), getattr(loaded, name).parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(agent.critic(x, torch.zeros(4, 1)), loaded.critic(x, torch.zeros(4, 1)))
    other = DUALAgent(3, 1, scales, width=16, depth=1)
    other.init_weights(4)
    assert not torch.equal(other.actor.head.weight, agent.actor.head.weight)


def test_minibatch_mixes_buffers_by_fraction():
    scales = Scales([0.0], [1.0], [-1.0], [1.0], [0.0], [1.0])
    a = ReplayBuffer.from_arrays(scales, np.zeros((10, 1)), np.zeros((10, 1)), np.zeros(10),
                                 np.zeros((10, 1)), np.zeros(10))
    b = ReplayBuffer(1, 1, 5)
    rng = np.random.default_rng(0)
    assert len(minibatch([(a, 0.5), (b, 0.5)], 8, rng)) == 8  # the empty buffer's share goes to a
    b.add(scales, np.ones((5, 1)), np.ones((5, 1)), np.ones(5), np.ones((5, 1)), np.zeros(5))
    batch = minibatch([(a, 0.25), (b, 0.75)], 8, rng)
    assert int(batch.reward.sum()) == 6


def test_the_shipped_hopper_agent_loads_with_its_posterior_and_proposes_scored_actions():
    from genunc.posterior import HeadPosterior
    from genunc.rl.data import OfflineDataset, shipped_dir
    from genunc.rl.offline import actor_pipeline

    folder = shipped_dir("Hopper-v5") / "dual_agent"
    agent, meta = DUALAgent.load(folder)
    assert (agent.state_dim, agent.action_dim, meta["width"]) == (11, 3, 128)
    pipe = actor_pipeline(agent)
    pipe.posterior = HeadPosterior.load(folder / "posterior", agent.actor)  # fingerprint checked
    states = agent.scales.state(OfflineDataset.load("zoo:rl/hopper-medium").observations[:2])
    out = pipe(states, num_candidates=10, num_draws=8, scores=("action_variance",), seed=0)
    assert out.samples.shape == (2, 10, 3) and out.samples.abs().max() <= 1
    assert (out.scores["action_variance"] > 0).all()
    assert torch.isfinite(agent.critic.min_q(states.repeat_interleave(10, 0),
                                             out.samples.reshape(20, 3))).all()


def test_tables_print_one_seed_without_an_interval():
    from genunc.rl.run import format_differences, format_table

    one, two = (5.0, float("nan"), float("nan")), (5.0, 4.0, 6.0)
    table = format_table([{"variant": "calql", "seeds": 1, "step_0": one, "auc": one, "dip": one,
                           "shift_detected": 0, "minutes_per_run": 1.0}])
    assert "nan" not in table and "5.0 (1 seed)" in table
    differences = format_differences([{"pair": "a - b", "seeds": 2, "auc": two, "final": one}])
    assert "+5.0 [+4.0, +6.0]" in differences and "+5.0 (1 seed)" in differences
