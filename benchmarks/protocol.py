"""What the evaluation scripts share: the validation and test seeds, the step windows the
validation seed chooses the variability score's among, and that re-aggregation (docs/results.md "How the
numbers are made")."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from genunc.scores import variability_score

#: anything chosen is chosen on the validation seed; every reported figure is on the test seed
VAL_SEED, TEST_SEED = 1000, 2000


def cached(out_dir: str | Path, key: str, make: Callable[[], dict]) -> SimpleNamespace:
    """A run's results: what ``make()`` returns (a dict, plus ``seconds``, how long it took), or
    what an identical earlier run saved under `key` (``out_dir/run_<key>.pt``).  The key must
    name everything that decides the result (the posterior's digest, sizes, seeds, settings)."""
    path = Path(out_dir) / f"run_{key}.pt"
    if path.exists():
        return SimpleNamespace(**torch.load(path, weights_only=False))
    start = time.perf_counter()
    result = make()
    result["seconds"] = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, path)
    return SimpleNamespace(**result)


def windows(steps: int) -> dict[str, np.ndarray]:
    """Step-index windows of a trajectory of `steps` steps."""
    idx = np.arange(steps)
    return {"all steps": idx, "first half": idx[: steps // 2], "second half": idx[steps // 2 :],
            "middle 20-80%": idx[int(0.2 * steps) : int(0.8 * steps)],
            "last 20%": idx[int(0.8 * steps) :]}


def windowed_variability(out, alphas_cumprod, rows: np.ndarray, target: str,
                         part: str = "variability") -> np.ndarray:
    """A pipeline output's variability re-aggregated over the steps `rows` with `target`."""
    return variability_score(out.variability_per_step[part][rows], out.variability_timesteps[rows],
                             alphas_cumprod, target)


def fmt(est: float, low: float, high: float, digits: int = 3) -> str:
    """An estimate with its interval."""
    return f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def image_selection_table(scores: dict[str, np.ndarray], wrong: np.ndarray, feats: np.ndarray,
                          real: np.ndarray, labels, keep: float, boot: int) -> None:
    """The image protocol's table, judged by the independent judge: per score the AUROC for
    "judge disagrees", the judge's agreement and the FID (judge features vs `real`) of the kept
    fraction, globally and within each class, each beside the random score's kept set on the
    same resamples (``scores["random"]``).  FID gets a basic interval on ``boot // 5`` resamples."""
    from genunc import filtering
    from genunc.metrics.image import frechet_distance, precision_recall
    from genunc.metrics.stats import bootstrap_interval

    labels = np.asarray(labels)
    good = ~wrong
    print("| score | AUROC (judge disagrees) | judge agrees, kept 80% | Delta vs random | FID, kept 80% "
          "| Delta FID vs random | precision | recall | judge agrees, 80% per class | Delta vs random |")
    print("|---|---|---|---|---:|---|---:|---:|---|---|")
    p, r = precision_recall(real, feats)
    print(f"| all samples (100%) | | {good.mean():.3f} | | {frechet_distance(real, feats):.2f} | "
          f"| {p:.3f} | {r:.3f} | | |")
    rand = scores["random"]

    def keep_g(s: np.ndarray) -> np.ndarray:
        return filtering.keep_fraction(s, keep)

    def within(s: np.ndarray, g: np.ndarray, c: np.ndarray) -> float:
        return g[filtering.keep_fraction_within(s, c, keep)].mean()

    def fid_of(s: np.ndarray, f: np.ndarray) -> float:
        return frechet_distance(real, f[keep_g(s)])

    for name, values in scores.items():
        kept = keep_g(values)
        auroc = bootstrap_interval(filtering.auroc, values, wrong, n_boot=boot)
        agree = bootstrap_interval(lambda s, g: g[keep_g(s)].mean(), values, good, n_boot=boot)
        d_agree = bootstrap_interval(lambda s, q, g: g[keep_g(s)].mean() - g[keep_g(q)].mean(),
                                     values, rand, good, n_boot=boot)
        fid = bootstrap_interval(fid_of, values, feats, n_boot=boot // 5, method="basic")
        d_fid = bootstrap_interval(lambda s, q, f: fid_of(s, f) - fid_of(q, f), values, rand, feats,
                                   n_boot=boot // 5)
        agree_within = bootstrap_interval(within, values, good, labels, n_boot=boot)
        d_within = bootstrap_interval(lambda s, q, g, c: within(s, g, c) - within(q, g, c),
                                      values, rand, good, labels, n_boot=boot)
        p, r = precision_recall(real, feats[kept])
        print(f"| {name} | {fmt(*auroc)} | {fmt(*agree)} | {fmt(*d_agree)} "
              f"| {fmt(*fid, 2)} | {fmt(*d_fid, 2)} | {p:.3f} | {r:.3f} "
              f"| {fmt(*agree_within)} | {fmt(*d_within)} |")
        kept_share = [np.isin(np.flatnonzero(labels == c), kept).mean() for c in np.unique(labels)]
        print(f"|   class mix kept globally: {min(kept_share):.0%} to {max(kept_share):.0%} per class "
              f"| | | | | | | | | |")


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `repeats` calls of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def x0_grid(steps: int) -> list[int]:
    """The steps semantic_x0 is recorded at on the validation seed: every 5th, and the last."""
    return sorted(set(range(0, steps, 5)) | {steps - 1})


def choose_x0_steps(per_step: np.ndarray, wrong: np.ndarray | None, grid: list[int], draws: int,
                    criterion=None, label: str = "AUROC(judge disagrees)") -> list[int]:
    """semantic_x0's steps, chosen on the validation seed: the contiguous window of the grid
    whose mean per-step entropy ``(S, N)`` scores best by `criterion` (values -> higher is
    better; default the AUROC for "judge disagrees", ``wrong``)."""
    from genunc import filtering

    if criterion is None:
        criterion = lambda values: filtering.auroc(values, wrong)  # noqa: E731
    table = {(a, b): criterion(per_step[a : b + 1].mean(0))
             for a in range(len(grid)) for b in range(a, len(grid))}
    print(f"\nsemantic_x0 on the validation seed (M = {draws}), {label} of "
          f"single grid steps: " + ", ".join(f"{grid[a]}: {table[a, a]:.3f}"
                                             for a in range(len(grid))))
    print(f"  all grid steps {grid}: {table[0, len(grid) - 1]:.3f}")
    a, b = max(table, key=lambda k: np.nan_to_num(table[k], nan=-np.inf))
    print(f"chosen: steps {grid[a : b + 1]} (mean of their entropies), validation {label} "
          f"{table[a, b]:.3f}")
    return grid[a : b + 1]


def compare_x0(args, x0, semantic: np.ndarray, wrong: np.ndarray) -> None:
    """semantic_x0 against the full semantic score on the same test digits, paired."""
    from genunc import filtering
    from genunc.metrics.stats import bootstrap_interval, spearman

    values, good = x0.scores["semantic_x0"], ~wrong
    keep_g = lambda s: filtering.keep_fraction(s, args.keep)  # noqa: E731
    d_auroc = bootstrap_interval(lambda s, q, w: filtering.auroc(s, w) - filtering.auroc(q, w),
                                 values, semantic, wrong, n_boot=args.boot)
    d_agree = bootstrap_interval(lambda s, q, g: g[keep_g(s)].mean() - g[keep_g(q)].mean(),
                                 values, semantic, good, n_boot=args.boot)
    se = x0.scores.get("semantic_x0_se")
    print(f"\nsemantic_x0 vs the full semantic score (M = {args.draws} generations), test seed "
          f"{TEST_SEED}, paired bootstrap ({args.boot} resamples):")
    print("| semantic_x0 - semantic: Delta AUROC | Delta judge agrees, kept 80% | Spearman with "
          "semantic | Monte-Carlo error: median jackknife SE | SD of the score across digits |")
    print("|---|---|---:|---:|---:|")
    print(f"| {fmt(*d_auroc)} | {fmt(*d_agree)} | {spearman(values, semantic):.3f} | "
          f"{np.median(se):.3f} | {values.std():.3f} |")
    print(f"(the test run itself: {x0.seconds:.0f} s for {len(values)} digits)")
