"""The ``genunc`` command line.

Subcommands grow with the project; each one explains itself with ``--help``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genunc._version import __version__
from genunc.errors import GenuncError
from genunc.plugins import command_plugins


def _demo(args: argparse.Namespace) -> int:
    """Generative uncertainty on the shipped digits DDPM: contact sheet, CSV, retention plot."""
    from genunc.demos import digits as demo

    print(f"genunc {__version__}: digits demo -> {args.out}")
    summary = demo.run(args.out, n_samples=args.samples, num_draws=args.draws, steps=args.steps,
                       seed=args.seed)
    post = summary["posterior"]
    print(f"posterior: {post['structure']} over '{post['head']}' ({post['n_params']} weights, "
          f"{post['n_data_rows']} rows), prior precision {post['prior_precision']:.4g}, "
          f"sigma {_sigma_text(post['sigma_noise'])}, "
          f"relative perturbation {post['relative_perturbation']:.3g}")
    print(f"{summary['n_samples']} digits, M = {summary['num_draws']} draws, {summary['steps']} "
          f"DDIM steps; the independent judge sees the requested digit in "
          f"{summary['class_agreement_all']:.1%}")
    print(f"{'score':<16}{'AUROC(wrong)':>14}{'agree@80%':>12}{'Spearman(p)':>13}")
    for name, row in summary["scores"].items():
        print(f"{name:<16}{row['auroc_wrong_class']:>14.3f}{row['agreement_kept_80pct']:>12.1%}"
              f"{row['spearman_vs_p_label']:>13.3f}")
    secs = summary["seconds"]
    print(f"time: posterior {secs['posterior']:.1f}s, generation {secs['generation']:.1f}s, "
          f"features {secs['features']:.1f}s")
    print(f"wrote {args.out}/contact_sheet.png, scores.csv, retention.png, summary.json")
    return 0


def _sigma_text(sigma: float | dict[str, float] | None) -> str:
    if isinstance(sigma, dict):
        return ", ".join(f"{name} {value:.4g}" for name, value in sigma.items())
    return "n/a" if sigma is None else f"{sigma:.4g}"


def _config(args: argparse.Namespace) -> dict:
    from genunc.config import load_config

    return load_config(args.config, args.set or [])


def _fit(args: argparse.Namespace) -> int:
    from genunc.jobs import job_for
    from genunc.jobs.base import posterior_dir

    config = _config(args)
    job = job_for(config["modality"])
    posterior = job.fit_posterior(job.build_pipeline(config, posterior="none"), config)
    summary = posterior.summary()
    width = max(map(len, summary))
    for key, value in summary.items():
        print(f"{key:>{width}}: {value}")
    print(f"saved to {posterior_dir(config)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from genunc.jobs import job_for

    config = _config(args)
    try:
        export = job_for(config["modality"]).generate(config)
    except KeyboardInterrupt:
        out = Path(config["generate"]["out"])
        kept = _committed(out)
        print(f"interrupted: {kept} samples kept in {out}; re-run the same command to resume"
              if kept else "interrupted before the first sample: nothing was written",
              file=sys.stderr)
        return 130
    shard = export.metadata.get("shard")
    if shard:  # under a launcher, other processes still write their shards
        print(f"rank {shard['rank']} of {shard['world_size']}: {len(export)} scored samples in "
              f"{export.directory}; the last process to finish merges the shards into "
              f"{config['generate']['out']} (or run `genunc merge {config['generate']['out']}`)")
        return 0
    merged = f", merged from {len(export.metadata['merged_from'])} shards" \
        if export.metadata.get("merged_from") else ""
    print(f"{len(export)} scored samples in {export.directory} (manifest.csv, samples/, "
          f"run.json){merged}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from genunc.jobs.shards import merge_shards

    export = merge_shards(args.export, args.world_size)
    print(f"{len(export)} scored samples in {export.directory}, merged from "
          f"{len(export.metadata['merged_from'])} shards")
    return 0


def _committed(out: Path) -> int:
    """Samples committed to an export folder so far (0 where there is none)."""
    manifest = out / "manifest.jsonl"
    return manifest.read_bytes().count(b"\n") if manifest.exists() else 0


def _repair(args: argparse.Namespace) -> int:
    from genunc.export.store import QUARANTINE, repair_manifest

    kept, moved = repair_manifest(args.export)
    print(f"{args.export}: kept {kept} manifest lines"
          + (f", moved {moved} damaged ones to {QUARANTINE}" if moved else ", none damaged"))
    return 0


def _filter(args: argparse.Namespace) -> int:
    from genunc.export import Export, filter_export

    provenance: dict = {}
    if args.risk_alpha is not None:
        import hashlib
        import json

        from genunc import labels
        from genunc.risk import calibrate_threshold

        if not args.calibration or not args.label:
            raise GenuncError("--risk-alpha needs --calibration EXPORT and --label COLUMN")
        if Path(args.calibration).resolve() == Path(args.export).resolve():
            raise GenuncError("calibrate on held-out samples, not on the export you filter")
        cal = Export(args.calibration)
        from genunc.jobs.base import shared_samples

        cal_meta = cal.metadata
        shared = shared_samples(cal_meta, Export(args.export).metadata)
        if shared:
            seed = cal_meta["identity"]["generate.seed"]
            raise GenuncError(
                f"{args.calibration} and {args.export} share their first {shared} samples (same "
                f"model, posterior, settings and generate.seed={seed}): calibrate on samples the "
                f"filtered export does not hold, e.g. with another generate.seed")
        failed = labels.failures(cal.column(args.label).tolist(), args.label,
                                 fail_below=args.fail_below, fail_above=args.fail_above)
        control = calibrate_threshold(cal.column(args.score).astype(float), failed,
                                      alpha=args.risk_alpha, delta=args.delta)
        print(control.describe())
        args.threshold = control.threshold
        provenance = {"risk_control": {
            **control.to_dict(), "failure": labels.describe(args.label, args.fail_below,
                                                            args.fail_above),
            "calibration_export": str(Path(args.calibration).resolve()),
            "calibration_identity_sha256": hashlib.sha256(json.dumps(
                cal.metadata.get("identity") or cal.metadata.get("config"), sort_keys=True,
                default=str).encode()).hexdigest()}}
    if Path(args.export).suffix.lower() == ".sdf":
        from genunc.export.sdf import filter_sdf

        if args.best_of or args.symlink or args.within:
            raise GenuncError("--best-of, --within and --symlink work on export directories, not "
                              "SDF files")
        if Path(args.out).exists():
            raise GenuncError(f"{args.out} exists; filtered molecules go to a new file")
        info = filter_sdf(args.export, args.out, args.score, fraction=args.fraction, k=args.k,
                          threshold=args.threshold)
        print(f"kept {info['kept']} of {info['total']} molecules by '{args.score}' -> {args.out}")
        return 0
    out = filter_export(args.export, args.out, args.score, fraction=args.fraction, k=args.k,
                        threshold=args.threshold, group_by=args.best_of, within=args.within,
                        link="symlink" if args.symlink else "copy", provenance=provenance)
    kept = Export(out)
    print(f"kept {len(kept)} of {kept.metadata['n_source']} samples by '{args.score}' -> {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from genunc import filtering
    from genunc.export import Export
    from genunc.report import evaluate_export, score_columns

    export = Export(args.export)
    names = args.scores.split(",") if args.scores else score_columns(export)
    result = evaluate_export(export, args.quality, names, fail_below=args.fail_below,
                             fail_above=args.fail_above)
    print(f"{len(export)} samples in {args.export}; quality column '{args.quality}' "
          f"(mean {result.quality.mean():.3f}); AUROC: {result.rule}")
    print(f"{'score':<16}{'Spearman':>10}{'AUROC':>8}{'AURC':>8}{'q@80%':>8}")
    for row in result.rows:
        print(f"{row.name:<16}{row.spearman:>10.3f}{row.auroc:>8.3f}"
              f"{row.area_under_retention:>8.3f}{row.quality_kept:>8.3f}")
    if args.plot:
        curves = {row.name: result.retention(row.name) for row in result.rows}
        filtering.plot_retention(args.plot, curves, ylabel=f"mean {args.quality} of kept")
        print(f"retention plot: {args.plot}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from genunc.report import write_report

    path = write_report(args.export, args.out, quality=args.quality,
                        scores=args.scores.split(",") if args.scores else None,
                        fail_below=args.fail_below, fail_above=args.fail_above,
                        extremes=args.extremes)
    print(f"report: {path}")
    if args.png:
        from genunc.report.browser import screenshot

        print(f"screenshot: {screenshot(path, args.png)}")
    return 0


def failure_rule(parser: argparse.ArgumentParser) -> None:
    """--fail-below / --fail-above: what fails in a continuous quality column (genunc.labels)."""
    for side, word in (("below", "below"), ("above", "above")):
        parser.add_argument(f"--fail-{side}", type=float,
                            help=f"a sample fails where the quality column is {word} this")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genunc",
        description="Post-hoc Laplace uncertainty for pretrained diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"genunc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the demo job",
        description="Generate digits with the shipped DDPM, score their uncertainty, and write a "
        "contact sheet sorted by uncertainty, a CSV of scores and a retention plot.",
        epilog="example: genunc demo --samples 256 --draws 5 --out outputs/demo",
    )
    demo.add_argument("--samples", type=int, default=256, help="digits to generate (default 256)")
    demo.add_argument("--draws", type=int, default=5, help="posterior draws M (default 5)")
    demo.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="outputs/demo", help="output directory")
    demo.set_defaults(func=_demo)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="YAML run config (see configs/)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override a config entry, e.g. --set generate.n_samples=64 (repeatable)")

    fit = sub.add_parser(
        "fit", help="fit and save the head posterior of a model",
        description="Fit the Laplace posterior over the model's head and save it.",
        epilog="example: genunc fit -c configs/digits.yaml --set posterior.structure=kron")
    with_config(fit)
    fit.set_defaults(func=_fit)

    gen = sub.add_parser(
        "generate", help="generate scored samples into an export directory",
        description="Generate samples with uncertainty scores; writes samples/, manifest.jsonl, "
        "manifest.csv and run.json.  Re-running after an interruption resumes.",
        epilog="example: genunc generate -c configs/digits.yaml --set generate.n_samples=512 "
        "--set generate.out=outputs/digits512")
    with_config(gen)
    gen.set_defaults(func=_generate)

    flt = sub.add_parser(
        "filter", help="keep the least uncertain samples of an export",
        description="Write a filtered copy of an export, or of a scored SDF file (the source is "
        "not modified).  One rule: "
        "--fraction, --k, --threshold, --best-of COLUMN, or --risk-alpha (threshold certified on "
        "a held-out calibration export).",
        epilog="examples:\n  genunc filter outputs/export --out outputs/top80 --score semantic "
        "--fraction 0.8\n  genunc filter outputs/export --out outputs/safe --score semantic "
        "--risk-alpha 0.05 --calibration outputs/calib --label judge_agrees\n"
        "  genunc filter outputs/qm9/export --out outputs/qm9/kept --score variability "
        "--fraction 0.8 --within n_atoms\n"
        "  genunc filter outputs/qm9/export/samples.sdf --out kept.sdf --score variability "
        "--fraction 0.8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    flt.add_argument("export", help="export directory (or scored .sdf file) to filter")
    flt.add_argument("--out", required=True, help="new export directory (or .sdf file)")
    flt.add_argument("--score", default="semantic", help="score column (lower = keep)")
    flt.add_argument("--fraction", type=float)
    flt.add_argument("--k", type=int)
    flt.add_argument("--threshold", type=float)
    flt.add_argument("--best-of", metavar="COLUMN", help="keep the best sample per value of COLUMN")
    flt.add_argument("--within", metavar="COLUMN",
                     help="with --fraction: keep that fraction of every value of COLUMN (e.g. "
                     "condition, n_atoms), so the kept set keeps the mix of classes or sizes")
    flt.add_argument("--risk-alpha", type=float, help="tolerated failure rate among kept samples")
    flt.add_argument("--delta", type=float, default=0.1, help="risk-control failure probability")
    flt.add_argument("--calibration", help="export with quality labels for risk control")
    flt.add_argument("--label", help="quality column of the calibration export: a boolean column "
                     "fails where false; a continuous one needs --fail-below or --fail-above")
    failure_rule(flt)
    flt.add_argument("--symlink", action="store_true", help="symlink sample files instead of copying")
    flt.set_defaults(func=_filter)

    ev = sub.add_parser(
        "evaluate", help="how well do the scores rank quality in an export?",
        description="Spearman, AUROC for failure, area under the retention curve and quality of "
        "the kept 80%, per score column.  A boolean quality column fails where false; for a "
        "continuous one, --fail-below / --fail-above say what fails (the same rule as filter).",
        epilog="example: genunc evaluate outputs/export --quality judge_agrees --plot r.png")
    ev.add_argument("export")
    ev.add_argument("--quality", required=True, help="quality column (higher is better)")
    ev.add_argument("--scores", help="comma-separated score columns (default: all present)")
    ev.add_argument("--plot", help="write a retention plot here")
    failure_rule(ev)
    ev.set_defaults(func=_evaluate)

    rpt = sub.add_parser(
        "report", help="one self-contained HTML page to look at an export",
        description="The most and least uncertain samples of each score side by side (images, "
        "RDKit depictions, text coloured by per-token mutual information), the score "
        "distributions, retention curves against the random ranking, the risk-control "
        "certificate of a filtered export and the run's metadata, in one HTML file with no "
        "external asset.  Its numbers are those of genunc evaluate.",
        epilog="example: genunc report outputs/digits/export --out digits.html")
    rpt.add_argument("export")
    rpt.add_argument("--out", help="HTML file to write (default: <export>/report.html)")
    rpt.add_argument("--quality", help="quality column (default: the one the export's job "
                     "writes: judge_agrees, molecule_stable or correct)")
    rpt.add_argument("--scores", help="comma-separated score columns (default: all present)")
    rpt.add_argument("--extremes", type=int, default=12,
                     help="most and least uncertain samples shown per score (default 12)")
    rpt.add_argument("--png", help="also write a screenshot of the page here (needs Chromium)")
    failure_rule(rpt)
    rpt.set_defaults(func=_report)

    mrg = sub.add_parser(
        "merge", help="merge the shards of a multi-process generate run into one export",
        description="Under torchrun / accelerate launch each process writes the shard of its "
        "block of samples to <export>.shards/rank-R-of-W/ and the last one to finish merges "
        "them.  This merges by hand (e.g. after resuming one rank), checking that every sample "
        "index is there exactly once.",
        epilog="example: genunc merge outputs/export")
    mrg.add_argument("export", help="the export folder the config names (generate.out)")
    mrg.add_argument("--world-size", type=int,
                     help="merge the shards of the launch with this many processes (needed only "
                     "when shards of several launches sit side by side)")
    mrg.set_defaults(func=_merge)

    rep = sub.add_parser(
        "repair", help="move damaged manifest lines aside so an export can be read again",
        description="An export whose manifest.jsonl has a damaged line (not the torn last line a "
        "crash leaves) cannot be read: genunc will not silently drop what follows it.  This moves "
        "every damaged line, verbatim, to manifest.quarantine.jsonl and keeps the rest.",
        epilog="example: genunc repair outputs/digits/export")
    rep.add_argument("export")
    rep.set_defaults(func=_repair)

    from genunc.rl.cli import add_parser as add_rl

    add_rl(sub)
    for add_parser in command_plugins().values():  # registered commands (genunc.plugins)
        add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; user errors print one line (``--debug`` or GENUNC_DEBUG=1: the traceback)."""
    import os

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (GenuncError, OSError) as err:
        if args.debug or os.environ.get("GENUNC_DEBUG"):
            raise
        print(f"genunc {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
