"""Golden runs: every number genunc's public paths produce, recorded before a refactor and
compared after it (a behaviour-preserving change reproduces them bit for bit).

What runs, each small and seeded:
* the CLI jobs (``genunc fit`` + ``genunc generate``) on the four shipped configs, shrunk
  (a few samples, few steps, a small fit set): every manifest record;
* ``from_pipe`` on the tests' tiny random diffusers pipelines (DDPM, DDIM, Stable Diffusion,
  DiT, PixArt) with a head and (UNets) a tail posterior, and on tiny LLaDA2 / DiffusionGemma text
  pipelines: every score, and a digest of the images or texts.

Usage:
    python benchmarks/golden.py --out /tmp/golden_before.json
    python benchmarks/golden.py --out /tmp/golden_after.json --compare /tmp/golden_before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "pipelines"))

#: the shipped configs, each shrunk to seconds on a CPU
CLI_RUNS = {
    "digits": ["generate.n_samples=4", "generate.steps=4", "generate.chunk_size=3",
               "posterior.repeats=1"],
    "digits_latent": ["generate.n_samples=3", "generate.steps=3", "generate.chunk_size=2",
                      "posterior.repeats=1"],
    "qm9": ["generate.n_samples=3", "generate.steps=5", "generate.chunk_size=2",
            "posterior.max_samples=64", "posterior.repeats=1",
            "generate.scores=[semantic,variability,denoising_loss,random]"],
    "arith": ["generate.n_samples=4", "generate.candidates=2", "generate.num_draws=3",
              "generate.chunk_size=3", "posterior.max_samples=200", "posterior.repeats=1"],
}


def digest(array: Any) -> str:
    data = np.ascontiguousarray(np.asarray(array))
    return hashlib.sha256(str(data.dtype).encode() + str(data.shape).encode()
                          + data.tobytes()).hexdigest()[:16]


def cli_runs(folder: Path) -> dict[str, Any]:
    from genunc.cli import main
    from genunc.export import Export

    results = {}
    for name, overrides in CLI_RUNS.items():
        out = folder / name
        sets = [f"posterior.dir={out / 'posterior'}", f"generate.out={out / 'export'}", *overrides]
        args = [x for s in sets for x in ("--set", s)]
        config = str(REPO / "configs" / f"{name}.yaml")
        assert main(["fit", "-c", config, *args]) == 0, name
        assert main(["generate", "-c", config, *args]) == 0, name
        export = Export(out / "export")
        files = {r["sample_id"]: digest(np.frombuffer(export.path(r).read_bytes(), np.uint8))
                 for r in export.records}
        records = [{k: v for k, v in r.items() if k != "file"} for r in export.records]
        results[f"cli/{name}"] = {"records": records, "files": files}
        print(f"cli/{name}: {len(records)} records", flush=True)
    return results


def _scores(out: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {k: np.asarray(v, dtype=np.float64).tolist()
                             for k, v in out.scores.items()}
    for name in ("score_errors", "errors"):
        errors = getattr(out, name, None)
        if errors:
            entry["errors"] = {k: np.asarray(v, dtype=np.float64).tolist()
                               for k, v in errors.items()}
    return entry


def wrapped_image(folder: Path) -> dict[str, Any]:
    from test_from_pipe import ALL_SCORES, build

    from genunc.features import flatten_pixels
    from genunc.pipelines import ImageUncertaintyPipeline

    results = {}
    for kind in ("ddpm", "ddim", "sd", "dit", "pixart"):
        # a tail posterior through from_pipe covers UNets (a DiT's last layers are no chain)
        for scope in ("head", "tail") if kind in ("ddpm", "ddim", "sd") else ("head",):
            pipe, call, fit = build(kind, folder=folder / kind)
            pipe.set_progress_bar_config(disable=True)
            upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
            images = fit.pop("images")
            upipe.fit_posterior(images, progress=False, **fit,
                                **({"tail": 1} if scope == "tail" else {}))
            for variance in (("monte_carlo",) if scope == "tail" else ("exact", "monte_carlo")):
                out = upipe(generator=torch.Generator().manual_seed(3), output_type="np",
                            num_draws=3, scores=ALL_SCORES, variance=variance, seed=1,
                            progress=False, **call)
                key = f"wrapped/{kind}/{scope}/{variance}"
                results[key] = {**_scores(out), "images": digest(out.images)}
                print(key, flush=True)
    return results


def wrapped_text() -> dict[str, Any]:
    import test_text_from_pipe as llada
    import test_text_gemma as gemma


    results = {}
    upipe = llada.fitted_wrapper()
    out = upipe(prompt=llada.PROMPTS, generator=torch.Generator().manual_seed(3), num_draws=3,
                seed=1, **llada.SAMPLED)
    results["wrapped/llada2"] = {**_scores(out), "texts": list(out.texts)}
    fitted = gemma.fitted_wrapper()
    out = fitted(prompt=gemma.PROMPTS, generator=torch.Generator().manual_seed(3), num_draws=3,
                 seed=1, temperature=1.0, **gemma.CALL)
    results["wrapped/gemma"] = {**_scores(out), "texts": list(out.texts)}
    print("wrapped/text", flush=True)
    return results


def compare(before: dict[str, Any], after: dict[str, Any]) -> int:
    """Print what differs; 0 when every entry is identical."""
    differ = 0
    for key in sorted(set(before) | set(after)):
        if key not in before or key not in after:
            print(f"{key}: only {'after' if key in after else 'before'}")
            differ += 1
            continue
        if before[key] == after[key]:
            continue
        differ += 1
        worst = _max_difference(before[key], after[key])
        print(f"{key}: differs (largest numeric difference {worst:.3g})")
    print(f"{len(set(before) | set(after)) - differ} identical, {differ} differ")
    return 1 if differ else 0


def _max_difference(a: Any, b: Any) -> float:
    if isinstance(a, dict) and isinstance(b, dict):
        return max((_max_difference(a.get(k), b.get(k)) for k in set(a) | set(b)), default=0.0)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return max((_max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) if math.isfinite(a) and math.isfinite(b) else float(a != b)
    return 0.0 if a == b else math.inf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        results = {**cli_runs(Path(folder)), **wrapped_image(Path(folder)), **wrapped_text()}
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"{len(results)} golden entries written to {args.out}")
    if args.compare:
        return compare(json.loads(args.compare.read_text()), results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
