"""What do the vector pipeline's scores cost over plain generation of the same candidates?

A Hopper-sized diffusion actor (state 11, action 3; the 3 x 256 MLP of Diffusion-QL, untrained:
timing does not depend on the weights) on a 5-step DDPM chain with clipping, its head posterior
fitted on random pairs.  For each number of contexts B, N candidates each, the median wall time
of several interleaved repeats of

  plain    num_draws=0, scores=()                       (the cost baseline)
  scored   num_draws=M, scores=(action_variance, variability)
  av       action_variance alone (M+1 chains per candidate)
  x0       action_variance_x0 alone (the MAP chain only; M+1 heads' clean predictions per step)
  var      variability alone (exact: no draws)

and the ratios to plain (median of the repeats' paired ratios).  The scored call's samples are
checked equal to plain generation's.

``--agreement``: does the one-chain ``action_variance_x0`` rank candidates as ``action_variance``
does?  On the shipped Hopper DUAL agent (genunc/zoo/weights/rl_hopper/dual_agent, its fitted head
posterior) and states of the held-out episodes of ``zoo:rl/hopper-medium`` (the ones DUAL
calibrates its detector on, never trained on), N candidates per state and M draws as DUAL's
online phase uses them: ``action_variance_x0`` at each single step and at all steps, its
Spearman with ``action_variance`` pooled over all candidates and within each state (the ranking
DUAL's ``Q + beta*u`` uses), the steps chosen by the within-state Spearman on validation states,
then reported on disjoint test states with bootstrap 95% intervals over states.

Usage:  python benchmarks/bench_action_scores.py [--contexts 1,64] [--candidates 16] [--draws 8]
            [--steps 5] [--repeats 7] [--device cpu|cuda] [--threads 2]
        python benchmarks/bench_action_scores.py --agreement [--states 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import DDPMScheduler

from genunc.metrics.stats import bootstrap_interval, spearman
from genunc.pipelines import VectorUncertaintyPipeline
from genunc.zoo.toy import ToyVectorDenoiser

VAL_SEED, TEST_SEED = 1000, 2000


def vp_betas(steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> list[float]:
    """Diffusion-QL's variance-preserving schedule for a `steps`-step chain."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    return (1 - np.exp(-beta_min / steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / steps**2)
            ).tolist()


def timed(calls: dict, repeats: int, device: str) -> dict[str, list[float]]:
    """Wall times of every call, interleaved (repeat r times each call once, so that a busy
    machine's load weighs on all of them alike), after one warm-up of each."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def within_state_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(B, N)`` scores -> ``(B,)`` Spearman of the N candidates' ranks in each state."""
    return np.array([spearman(x, y) for x, y in zip(a, b)])


def agreement(args: argparse.Namespace) -> None:
    """action_variance_x0 against action_variance on the shipped Hopper agent (see the module
    docstring)."""
    from genunc.posterior import HeadPosterior
    from genunc.rl.agent import DUALAgent
    from genunc.rl.config import load_rl_config
    from genunc.rl.offline import actor_pipeline
    from genunc.rl.run import load_dataset
    from genunc.zoo.shipped import WEIGHTS_DIR

    folder = WEIGHTS_DIR / "rl_hopper" / "dual_agent"
    agent, _ = DUALAgent.load(folder)
    pipe = actor_pipeline(agent)
    pipe.posterior = HeadPosterior.load(folder / "posterior", agent.actor)
    config = load_rl_config("configs/hopper.yaml", [])
    n, m = config["online"]["candidates"], config["online"]["num_draws"]
    steps = len(agent.actor_scheduler.alphas_cumprod)
    _, held_out = load_dataset(config).split(config["data"]["held_out"], config["seed"])
    rows = np.random.default_rng(0).permutation(len(held_out))[: 2 * args.states]
    print(f"shipped Hopper agent, {steps}-step actor, N = {n} candidates, M = {m} draws; "
          f"{args.states} validation and {args.states} test states of the held-out episodes")
    x0, av = {}, {}  # per part: window -> (B, N) action_variance_x0; the (B, N) action_variance
    windows = {f"step {k}": [k] for k in range(steps)} | {"all steps": list(range(steps))}
    for name, seed, part in (("validation", VAL_SEED, rows[: args.states]),
                             ("test", TEST_SEED, rows[args.states :])):
        states = agent.scales.state(held_out.observations[part])
        t0 = time.perf_counter()
        out = pipe(states, num_candidates=n, num_draws=m, seed=seed,
                   scores=("action_variance", "action_variance_x0"), x0_steps=list(range(steps)))
        per_step = out.semantic_x0_per_step  # (S, B, N)
        x0[name] = {w: per_step[ks].mean(0) for w, ks in windows.items()}
        av[name] = out.scores["action_variance"]
        print(f"{name} (seed {seed}, {time.perf_counter() - t0:.1f} s):")
        for w, score in x0[name].items():
            within = within_state_spearman(score, av[name])
            pooled = spearman(score.ravel(), av[name].ravel())
            print(f"  {w:>10}: within-state Spearman {np.nanmean(within):+.3f}, pooled "
                  f"{pooled:+.3f}")
    chosen = max(windows, key=lambda w: np.nanmean(within_state_spearman(x0["validation"][w],
                                                                          av["validation"])))
    test, test_av = x0["test"][chosen], av["test"]
    within = within_state_spearman(test, test_av)
    _, lo, hi = bootstrap_interval(np.nanmean, within)
    pooled = spearman(test.ravel(), test_av.ravel())
    chosen_argmin = (test.argmin(1) == test_av.argmin(1)).mean()
    print(f"chosen on validation: {chosen}; test: within-state Spearman {np.nanmean(within):+.3f} "
          f"[{lo:+.3f}, {hi:+.3f}], pooled {pooled:+.3f}; the same least-uncertain candidate in "
          f"{chosen_argmin:.1%} of states (chance {1 / n:.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--contexts", default="1,64", help="comma-separated numbers of contexts B")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--state-dim", type=int, default=11)
    parser.add_argument("--action-dim", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--agreement", action="store_true",
                        help="rank agreement of action_variance_x0 with action_variance on the "
                        "shipped Hopper agent instead of the timings")
    parser.add_argument("--states", type=int, default=200,
                        help="with --agreement: validation states, and as many test states")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.agreement:
        agreement(args)
        return
    torch.manual_seed(0)
    model = ToyVectorDenoiser(args.action_dim, args.state_dim, args.width, args.depth)
    scheduler = DDPMScheduler(num_train_timesteps=args.steps, trained_betas=vp_betas(args.steps),
                              clip_sample=True)
    pipe = VectorUncertaintyPipeline(model.to(args.device).eval(), scheduler)
    states = torch.randn(2000, args.state_dim)
    pipe.fit_posterior({"x": torch.rand(2000, args.action_dim) * 2 - 1, "cond": states},
                       progress=False)
    calls = {"plain": dict(num_draws=0, scores=()),
             "scored": dict(num_draws=args.draws, scores=("action_variance", "variability")),
             "av": dict(num_draws=args.draws, scores=("action_variance",)),
             "x0": dict(num_draws=args.draws, scores=("action_variance_x0",)),
             "var": dict(num_draws=0, scores=("variability",))}
    print(f"device {args.device}, {torch.get_num_threads()} threads; {args.width}x{args.depth} MLP, "
          f"state {args.state_dim}, action {args.action_dim}, N={args.candidates}, "
          f"M={args.draws}, K={args.steps}; median of {args.repeats}")
    print(f"{'B':>4} {'plain ms':>9} {'scored ms':>10} {'scored/plain':>13} {'av/plain':>9} "
          f"{'x0/plain':>9} {'var/plain':>10}")
    for b in (int(v) for v in args.contexts.split(",")):
        cond = torch.randn(b, args.state_dim, generator=torch.Generator().manual_seed(b))
        plain = pipe(cond, num_candidates=args.candidates, num_inference_steps=args.steps,
                     seed=0, **calls["plain"])
        scored = pipe(cond, num_candidates=args.candidates, num_inference_steps=args.steps,
                      seed=0, **calls["scored"])
        gap = float((plain.samples - scored.samples).abs().max())
        def call(kw, cond=cond):
            return pipe(cond, num_candidates=args.candidates, num_inference_steps=args.steps,
                        seed=0, **kw)

        times = timed({name: lambda kw=kw: call(kw) for name, kw in calls.items()},
                      args.repeats, args.device)
        median = {name: statistics.median(t) for name, t in times.items()}
        ratio = {name: statistics.median(a / p for a, p in zip(t, times["plain"]))
                 for name, t in times.items()}  # the median of the repeats' paired ratios
        print(f"{b:>4} {1e3 * median['plain']:>9.2f} {1e3 * median['scored']:>10.2f} "
              f"{ratio['scored']:>13.2f} {ratio['av']:>9.2f} {ratio['x0']:>9.2f} "
              f"{ratio['var']:>10.2f}"
              + ("" if gap == 0 else f"   (scored samples differ from plain by {gap:.1e})"))


if __name__ == "__main__":
    main()
