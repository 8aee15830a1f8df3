"""The molecular seed paper's protocol (arXiv 2606.13451) as one command, for any molecule model.

    OMP_NUM_THREADS=1 python benchmarks/paper_protocol.py --model qm9_edm --n 1000
    python benchmarks/paper_protocol.py --model path/to/edm_folder --tail 1 --n 10000 --steps 1000

``--model``: a genunc molecule folder, an EDM or GeoLDM output folder (``args.pickle`` +
``generative_model_ema.npy``), or the name of a shipped model (``qm9_edm``).  The paper reports
Spearman rho(uncertainty, molecule stability) on QM9 of -0.284 (EDM) and -0.333 (GeoLDM), against
-0.150 / -0.171 for the model's own likelihood.  This script measures the same quantities with
genunc, in one output format for every model (a markdown table on stdout and a JSON file with
the same numbers), so that runs on different models compare:

1. quality of the generated molecules (EDM's bond-table atom / molecule stability, RDKit
   validity, uniqueness, novelty) beside the real-data calibration row;
2. per score, Spearman with molecule stability, atom-stable fraction and validity: raw (the
   paper's number), partial (atom count's ranks regressed out) and within atom-count bins
   (weighted mean of per-size correlations, bins of >= ``--min-bin``); and with the atom count;
3. test-time scaling: keep the least uncertain x% (``--keep``), molecule stability / validity /
   uniqueness of the kept set and its difference from the random score's kept set;
4. the semantic score on the first ``--semantic-n`` test molecules (its MAP generations are
   those molecules; checked), with the other scores on the same molecules.

Every figure has a percentile bootstrap 95% interval over the test molecules (``--boot``
resamples; paired: every score and label of a molecule move together).

Scores.  ``variability``: the variance of the predicted noise (positions + atom types) across
the head (or, with ``--tail k``, the last-k-blocks) posterior, averaged over atoms and feature
dimensions at each step, then over the steps.  The paper aggregates the elementwise variance
of the noise prediction over timesteps, atoms and dimensions and says a small subset of
timesteps suffices, without a subset genunc could copy; so "the paper's" row uses every step
and the noise target (as benchmarks/eval_molecules.py does), with its parts
``variability_pos`` / ``variability_type``, and the subset is the one free choice: the step
window and target (:func:`protocol.windows` x noise/clean), made on the validation seed
(``protocol.VAL_SEED``), by the size-controlled (partial) Spearman with molecule stability, or
with the atom-stable fraction where the validation molecules' molecule stability does not vary;
everything reported is on the test seed (``--seed``, default ``protocol.TEST_SEED``).  The
likelihood baseline, the paper's "model's own likelihood", is ``nll`` for EDM and GeoLDM
checkpoints: -log p(x, h, N) of each generated molecule in nats as the model's evaluation
computes it (EDM: its variational bound, prior KL, the weighted step terms, the level-0 term
with the discretised atom-type and charge likelihoods, the normalisation constants; GeoLDM: that
bound on the molecule's encoded latent plus its decoder's reconstruction error and constants;
both with -log p(N)), its sum over the T steps estimated at ``--nll-levels`` stratified levels
with fixed noise (``--nll-levels 1000``: every level).  ``denoising_loss`` is reported beside it
(for genunc's own denoiser, which has no ``nll``, it is the baseline): the unweighted diffusion
loss over ``--nll-levels``
evenly spaced noise levels, a Monte-Carlo proxy of the bound up to constants and weights.
``random``: its own stream.  Lower score = more certain, so a useful score has a negative rho
with stability and validity.

A head posterior's variability is closed form (no draws); a block posterior's (``--tail``) is
Monte Carlo over ``--draws`` draws.  The posterior is fitted once on ``--n-fit`` training
molecules (QM9's EDM training split, or ``--data`` a molecule cache) and cached under
``--work``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from protocol import TEST_SEED, VAL_SEED, windowed_variability, windows  # benchmarks/protocol.py

from genunc import filtering
from genunc.errors import GenuncError
from genunc.metrics.molecule import canonical_training_smiles, evaluate_molecules
from genunc.metrics.stats import binned_spearman, bootstrap_interval, partial_spearman, spearman
from genunc.pipelines import MoleculeUncertaintyPipeline
from genunc.zoo.shipped import WEIGHTS_DIR

PAPER = {"EDM": {"variability": -0.284, "likelihood": -0.150},
         "GeoLDM": {"variability": -0.333, "likelihood": -0.171}}
LABELS = {"molecule_stable": "molecule stable", "atom_stable": "atom-stable fraction",
          "valid": "valid"}
LIKELIHOOD = ("nll: the model's own -log p(x, h, N) of each generated molecule (nats, as its "
              "evaluation computes it: EDM's variational bound, for GeoLDM on the encoded latent "
              "plus the decoder's terms; -log p(N) included), its sum over the T steps "
              "estimated at {levels} stratified noise levels with fixed noise; beside it "
              "denoising_loss, the unweighted diffusion loss over {levels} fixed noise levels "
              "(a proxy of the bound up to constants and weights)")
LIKELIHOOD_PROXY = ("denoising_loss: the diffusion loss of each generated molecule over {levels} "
                    "fixed noise levels, an unweighted Monte-Carlo proxy of the variational bound "
                    "on -log p (this model has no nll in genunc: {reason})")
PAPER_ROW = "variability (paper's: all steps, noise)"


# ------------------------------------------------------------------------------ loading
def resolve_model(name: str) -> Path:
    """A folder, or the name of a shipped model under genunc/zoo/weights."""
    path = Path(name)
    if path.is_dir():
        return path
    if (WEIGHTS_DIR / name).is_dir():
        return WEIGHTS_DIR / name
    shipped = sorted(p.name for p in WEIGHTS_DIR.iterdir() if p.is_dir())
    raise GenuncError(f"--model {name!r} is neither a folder nor a shipped model ({', '.join(shipped)})")


def training_data(data: str | None):
    """The molecules the posterior is fitted on (and novelty is judged against): QM9's EDM
    training split, or a molecule cache (all of it)."""
    from genunc.data.qm9 import edm_split, load_cache, load_qm9

    if data:
        return load_cache(Path(data))
    qm9 = load_qm9(progress=False)
    return qm9.subset(edm_split(len(qm9))["train"])


def load_pipeline(model: Path, train, n_fit: int, work: Path, tail: int | None
                  ) -> MoleculeUncertaintyPipeline:
    pipe = MoleculeUncertaintyPipeline.from_pretrained(model, posterior=None)
    n_fit = min(n_fit, len(train))
    batches = [pipe.adapter.encode(train, np.arange(i, min(i + 64, n_fit)))
               for i in range(0, n_fit, 64)]
    pipe.load_or_fit_posterior(work / ("posterior" if tail is None else f"posterior_tail{tail}"),
                               batches, stale="refit", progress=False,
                               **({"tail": tail} if tail else {}))
    return pipe


# ------------------------------------------------------------------------------ statistics
def interval(stat: Callable[..., float], *arrays, boot: int,
             method: str = "percentile") -> list[float | None]:
    """``[estimate, low, high]``, NaN as None (JSON has no NaN)."""
    return [None if not math.isfinite(v) else float(v)
            for v in bootstrap_interval(stat, *arrays, n_boot=boot, method=method)]


def labels_of(report) -> dict[str, np.ndarray]:
    return {"molecule_stable": report.molecule_stable.astype(float),
            "atom_stable": np.asarray(report.atom_stable_fraction, dtype=float),
            "valid": report.valid.astype(float)}


def correlations(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], sizes: np.ndarray,
                 boot: int, min_bin: int) -> dict:
    """Per score: rho with the atom count; per label rho raw, partial (size) and within bins."""
    def binned(s, y, g):
        return binned_spearman(s, y, g, min_size=min_bin)[0]

    out = {}
    for name, s in scores.items():
        row = {"size": interval(spearman, s, sizes, boot=boot)}
        for label, y in labels.items():
            row[label] = {"raw": interval(spearman, s, y, boot=boot),
                          "partial": interval(partial_spearman, s, y, sizes, boot=boot),
                          "binned": interval(binned, s, y, sizes, boot=boot)}
        out[name] = row
    return out


def selection(scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], smiles: list,
              sizes: np.ndarray, fractions: list[float], boot: int) -> dict:
    """Test-time scaling: the kept least uncertain fraction's molecule stability, validity and
    uniqueness (distinct valid SMILES / valid molecules; a resample's duplicated molecules count
    once, so resampling does not make molecules look repeated), each beside its difference from
    the random score's kept set on the same resamples (uniqueness: a basic interval, since
    resampling biases it; its difference from random is percentile, the bias being shared)."""
    smiles = np.array([s or "" for s in smiles], dtype=object)
    valid = labels["valid"] > 0.5

    def metric(name: str, ids: np.ndarray) -> float:
        if name == "uniqueness":
            ids = np.unique(ids)
            ids = ids[valid[ids]]
            return len(set(smiles[ids])) / len(ids) if len(ids) else float("nan")
        return float(labels[name][ids].mean())

    random = scores["random"]
    index = np.arange(len(random))
    out = {}
    for name, s in scores.items():
        rows = {}
        for fraction in fractions:
            def kept(values, idx, f=fraction):
                return idx[filtering.keep_fraction(values, f)]

            row = {"mean_atoms": float(sizes[kept(s, index)].mean())}
            for m in ("molecule_stable", "valid", "uniqueness"):
                # a resample holds fewer distinct molecules, hence fewer repeats: uniqueness
                # replicates sit above the estimate, so its level gets the basic interval
                row[m] = interval(lambda v, i, m=m: metric(m, kept(v, i)), s, index, boot=boot,
                                  method="basic" if m == "uniqueness" else "percentile")
                row[f"{m}_vs_random"] = interval(
                    lambda v, r, i, m=m: metric(m, kept(v, i)) - metric(m, kept(r, i)),
                    s, random, index, boot=boot)
            rows[f"{round(100 * fraction)}"] = row
        out[name] = rows
    return out


def quality_row(report) -> dict[str, float | None]:
    return {k: (None if v is None or not math.isfinite(v) else float(v))
            for k, v in report.row().items()}


# ------------------------------------------------------------------------------ the run
def choose_window(val, pipe, steps: int, labels: dict[str, np.ndarray], min_varied: int) -> dict:
    """The step window and target, chosen on the validation seed (see the module docstring)."""
    stable = labels["molecule_stable"]
    varied = min(stable.sum(), len(stable) - stable.sum()) >= min_varied
    label = "molecule_stable" if varied else "atom_stable"
    sizes = val.n_atoms.astype(float)
    table = {}
    for wname, rows in windows(steps).items():
        if len(rows) == 0:
            continue
        for target in ("noise", "clean"):
            values = windowed_variability(val, pipe.adapter.alphas_cumprod, rows, target)
            table[f"{wname} | {target}"] = partial_spearman(values, labels[label], sizes)
    finite = {k: v for k, v in table.items() if math.isfinite(v)}
    chosen = min(finite, key=finite.get) if finite else "all steps | noise"
    window, target = chosen.split(" | ")
    criterion = f"partial Spearman (atom count controlled) with {LABELS[label]}"
    if not varied:
        criterion += f" (molecule stability varies in fewer than {min_varied} validation molecules)"
    if not finite:
        criterion += "; undefined for every window, so the paper's default is kept"
    return {"criterion": criterion,
            "table": {k: (v if math.isfinite(v) else None) for k, v in table.items()},
            "window": window, "target": target}


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model = resolve_model(args.model)
    work = Path(args.work)
    train = training_data(args.data)
    pipe = load_pipeline(model, train, args.n_fit, work, args.tail)
    summary = pipe.posterior.summary()
    has_nll = pipe.adapter.nll_unavailable is None
    call = dict(num_inference_steps=args.steps, sampler=args.sampler, num_draws=args.draws,
                scores=("variability", "denoising_loss", *(("nll",) if has_nll else ()), "random"),
                nll_levels=args.nll_levels,
                chunk_size=args.chunk_size, progress=False,
                variance="monte_carlo" if args.tail else "exact")
    n_val = args.n_val if args.n_val is not None else max(args.n // 2, 8)
    val = pipe(n_val, seed=VAL_SEED, **call)
    val_report = evaluate_molecules(val.molecules)
    choice = choose_window(val, pipe, args.steps, labels_of(val_report), args.min_varied)
    seconds_val = time.perf_counter() - start

    tic = time.perf_counter()
    res = pipe(args.n, seed=args.seed, **call)
    seconds_test = time.perf_counter() - tic
    train_smiles = canonical_training_smiles(train.smiles[: args.n_novelty])
    report = evaluate_molecules(res.molecules, train_smiles)
    real_ids = np.random.default_rng(0).choice(len(train), min(args.n_real, len(train)), replace=False)
    real = evaluate_molecules([train.molecule(int(i)) for i in real_ids], train_smiles)

    rows = windows(args.steps)[choice["window"]]
    chosen = f"variability ({choice['window']}, {choice['target']}; chosen on validation)"
    scores = {PAPER_ROW: res.scores["variability"],
              "variability_pos": res.scores["variability_pos"],
              "variability_type": res.scores["variability_type"],
              chosen: windowed_variability(res, pipe.adapter.alphas_cumprod, rows, choice["target"]),
              **({"nll (likelihood baseline)": res.scores["nll"],
                  "denoising_loss (likelihood proxy)": res.scores["denoising_loss"]} if has_nll else
                 {"denoising_loss (likelihood baseline)": res.scores["denoising_loss"]}),
              "random": res.scores["random"]}
    labels = labels_of(report)
    sizes = res.n_atoms.astype(float)
    # a Monte-Carlo variability's draw noise beside the spread it ranks: jackknife SE
    mc = None if "variability_se" not in res.scores else {
        "median_se": float(np.median(res.scores["variability_se"])),
        "sd_across_molecules": float(np.std(res.scores["variability"]))}
    results = {
        "protocol": {
            "model": str(args.model), "model_path": str(model), "n": args.n, "n_val": n_val,
            "test_seed": args.seed, "val_seed": VAL_SEED, "steps": args.steps,
            "sampler": args.sampler or pipe.adapter.default_sampler, "tail": args.tail,
            "draws": args.draws, "variance": call["variance"], "n_fit": min(args.n_fit, len(train)),
            "boot": args.boot, "min_bin": args.min_bin, "keep": args.keep,
            "posterior": {k: summary.get(k) for k in ("prior_precision", "relative_perturbation",
                                                      "n_params") if k in summary},
            "likelihood_baseline": LIKELIHOOD.format(levels=args.nll_levels) if has_nll else
            LIKELIHOOD_PROXY.format(levels=args.nll_levels, reason=pipe.adapter.nll_unavailable),
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "seconds": {"validation": seconds_val, "test": seconds_test},
            "monte_carlo_error": mc,
        },
        "paper": PAPER,
        "validation_choice": choice,
        "quality": {"real": {"n": len(real_ids), **quality_row(real)},
                    "model": {"n": args.n, **quality_row(report)}},
        "correlations": correlations(scores, labels, sizes, args.boot, args.min_bin),
        "selection": selection(scores, labels, report.smiles, sizes, args.keep, args.boot),
        "semantic": None,
    }
    if args.semantic_n > 0:
        results["semantic"] = semantic_part(pipe, res, scores, labels, sizes, train, args, call)
    results["protocol"]["seconds"]["total"] = time.perf_counter() - start
    return results


def semantic_part(pipe, res, scores, labels, sizes, train, args, call) -> dict:
    """The semantic score (M + 1 generations each) on the first test molecules, whose MAP
    generations are those molecules, with the other scores on the same molecules."""
    from genunc.features.molecule import features_of

    n = min(args.semantic_n, args.n)
    pipe.set_feature_scale(features_of([train.molecule(i) for i in range(min(args.n_fit, len(train)))]))
    tic = time.perf_counter()
    sem = pipe(n, seed=args.seed, **{**call, "scores": ("semantic",),
                                     "num_draws": max(args.draws, 1)})
    seconds = time.perf_counter() - tic
    same = all(np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-4)
               for a, b in zip(sem.molecules, res.molecules[:n]))
    if not same:
        raise GenuncError("the semantic run's MAP molecules differ from the test molecules")
    rows = {"semantic": sem.scores["semantic"], **{k: v[:n] for k, v in scores.items()}}
    return {"n": n, "draws": max(args.draws, 1), "seconds": seconds,
            "correlations": correlations(rows, {k: v[:n] for k, v in labels.items()}, sizes[:n],
                                         args.boot, args.min_bin)}


# ------------------------------------------------------------------------------ output
def fmt(values: list[float | None], digits: int = 3, pct: bool = False) -> str:
    if values is None or values[0] is None:
        return "n/a"
    if pct:
        est, lo, hi = (None if v is None else 100 * v for v in values)
        return f"{est:.1f}%" + ("" if lo is None else f" [{lo:.1f}, {hi:.1f}]")
    est, lo, hi = values
    return f"{est:+.{digits}f}" + ("" if lo is None else f" [{lo:+.{digits}f}, {hi:+.{digits}f}]")


def correlation_table(corr: dict) -> list[str]:
    head = ["score", "rho(atom count)"] + [f"rho({LABELS[k]}) {w}" for k in LABELS
                                           for w in ("raw", "partial", "binned")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in corr.items():
        cells = [name, fmt(row["size"])] + [fmt(row[k][w]) for k in LABELS
                                            for w in ("raw", "partial", "binned")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(results: dict) -> str:
    """The markdown report: every number in it is one of `results`' (the JSON's)."""
    p, q = results["protocol"], results["quality"]
    scope = "head" if p["tail"] is None else f"last {p['tail']} blocks + head"
    lines = [f"# Paper protocol (arXiv 2606.13451): {p['model']}", "",
             f"{p['n']} test molecules (seed {p['test_seed']}), {p['steps']} {p['sampler']} steps; "
             f"posterior: {scope}, "
             f"{p['variance']} variability"
             + (f" over {p['draws']} draws" if p["variance"] == "monte_carlo" else "")
             + f", prior precision {p['posterior'].get('prior_precision', float('nan')):.4g}, "
             f"relative perturbation {p['posterior'].get('relative_perturbation', float('nan')):.3%}; "
             f"bootstrap 95% intervals ({p['boot']} resamples).", ""]
    mc = p.get("monte_carlo_error")
    if mc:
        lines += [f"Monte-Carlo error of the variability: median jackknife SE {mc['median_se']:.4g} "
                  f"against an SD of {mc['sd_across_molecules']:.4g} across molecules.", ""]
    lines += [f"Likelihood baseline: {p['likelihood_baseline']}.", "",
             f"Paper (QM9, rho with molecule stability): EDM variability {PAPER['EDM']['variability']}, "
             f"likelihood {PAPER['EDM']['likelihood']}; GeoLDM {PAPER['GeoLDM']['variability']} / "
             f"{PAPER['GeoLDM']['likelihood']}.", "",
             "| | n | atom stable | molecule stable | valid | unique | valid & unique | novel |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in (("real QM9 (training molecules)", q["real"]), ("model", q["model"])):
        cells = [row[k] for k in ("atom_stability", "molecule_stability", "validity", "uniqueness",
                                  "valid_and_unique", "novelty")]
        lines.append(f"| {name} | {row['n']} | " + " | ".join(
            "n/a" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")
    c = results["validation_choice"]
    lines += ["", f"Step window and target chosen on the validation seed ({p['val_seed']}, "
                  f"{p['n_val']} molecules) by {c['criterion']}: **{c['window']}, {c['target']}** ("
              + ", ".join(f"{k}: {'n/a' if v is None else f'{v:+.3f}'}" for k, v in c["table"].items())
              + ").", "", "Spearman correlations (partial: atom count controlled; binned: within "
              f"atom counts with >= {p['min_bin']} molecules; n/a: a side is constant):", ""]
    lines += correlation_table(results["correlations"])
    lines += ["", "Test-time scaling: keep the least uncertain x% (delta: minus the random score's "
              "kept set, same resamples; uniqueness = distinct valid SMILES / valid kept, basic "
              "interval):", "",
              "| score | kept | mean atoms | molecule stable | delta | valid | delta | uniqueness | delta |",
              "|---|---:|---:|---|---|---|---|---|---|"]
    for name, rows in results["selection"].items():
        for kept, row in rows.items():
            lines.append(f"| {name} | {kept}% | {row['mean_atoms']:.2f} | " + " | ".join(
                f"{fmt(row[m], pct=True)} | {fmt(row[m + '_vs_random'], pct=True)}"
                for m in ("molecule_stable", "valid", "uniqueness")) + " |")
    sem = results["semantic"]
    if sem:
        lines += ["", f"Semantic score on the first {sem['n']} test molecules (M = {sem['draws']}, "
                  f"{sem['seconds']:.0f} s; its MAP generations are the molecules above), the "
                  "other scores on the same molecules:", ""]
        lines += correlation_table(sem["correlations"])
    s = p["seconds"]
    lines += ["", f"Run: {p['date']}, {p['machine']}; validation {s['validation']:.0f} s, test "
              f"{s['test']:.0f} s, total {s['total']:.0f} s.", f"Command: `{p['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="qm9_edm", help="a model folder or a shipped model's name")
    parser.add_argument("--n", type=int, default=1000, help="test molecules")
    parser.add_argument("--n-val", type=int, default=None, help="validation molecules (default n/2)")
    parser.add_argument("--seed", type=int, default=TEST_SEED, help="the test seed")
    parser.add_argument("--tail", type=int, default=None, help="a block posterior over the last "
                        "TAIL blocks and the head (Monte-Carlo variability over --draws)")
    parser.add_argument("--steps", type=int, default=1000, help="sampler steps (EDM: 1000)")
    parser.add_argument("--sampler", default=None, choices=["ddpm", "ddim", "edm"],
                        help="default: the model's (EDM folders: EDM's own step)")
    parser.add_argument("--draws", type=int, default=5, help="M: Monte-Carlo draws / semantic draws")
    parser.add_argument("--semantic-n", type=int, default=0,
                        help="first test molecules also scored by the semantic score (M+1 generations)")
    parser.add_argument("--n-fit", type=int, default=2000, help="training molecules for the posterior")
    parser.add_argument("--data", help="a molecule cache (.npz) instead of QM9's training split")
    parser.add_argument("--n-real", type=int, default=1000, help="real molecules for the calibration row")
    parser.add_argument("--n-novelty", type=int, default=None,
                        help="training SMILES novelty is judged against (default all)")
    parser.add_argument("--nll-levels", type=int, default=10, help="noise levels of the nll and "
                        "denoising_loss scores (nll: stratified; >= T: every level)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--min-bin", type=int, default=20, help="smallest atom-count bin")
    parser.add_argument("--min-varied", type=int, default=10, help="the validation choice uses "
                        "molecule stability when at least this many molecules are on each side")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--work", default="outputs/paper_protocol", help="posterior cache")
    parser.add_argument("--out", default=None, help="the JSON (default WORK/results.json)")
    args = parser.parse_args(argv)
    if args.tail and args.draws < 3:
        parser.error("--tail needs --draws >= 3 (Monte-Carlo variability)")
    results = run(args)
    out = Path(args.out) if args.out else Path(args.work) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(render(results))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except GenuncError as err:
        sys.exit(f"paper_protocol: error: {err}")
