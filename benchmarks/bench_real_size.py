"""Cost of ``ImageUncertaintyPipeline.from_pipe`` at real model sizes, random weights, on CPU.

* Stable Diffusion 1.5: a diffusers ``StableDiffusionPipeline`` with SD 1.5's UNet config
  (``SD15`` of bench_large_heads.py, 860M parameters), SD's ``AutoencoderKL`` and a CLIP text
  encoder with SD 1.5's config (768 wide, 12 layers, 49,408-token vocabulary); 512 px images
  (64x64 latents), DDIM, classifier-free guidance 7.5, one prompt;
* DiT-XL/2: a ``DiTPipeline`` with DiT-XL/2's config (``DIT_XL2``; 750M parameters as diffusers
  builds it, each block with its own timestep and class embedding) and the same VAE; 256 px
  images (32x32 latents), DDIM, guidance 4.0, ``--labels`` class labels.

Nothing can be downloaded: every weight is random (seed 0), and the tokenizer is a CLIPTokenizer
over a small local vocabulary (letters; the text encoder keeps its 49,408 rows), as the tests
build it.  Each pipeline is built once and saved (``save_pretrained``) under ``--cache``; every
row runs in its own process, which loads it, so that every row sees the same weights and its
peak resident memory (``getrusage``) is its own.  Rows: the plain ``pipe(...)`` call;
``from_pipe`` with the exact ``variability`` only; ``semantic_x0`` with M = ``--x0-draws``;
``semantic`` with M = ``--draws``; and the head-posterior fit (``upipe.fit_posterior`` on
``--fit-images`` random images at the model's resolution, diagonal, marginal-likelihood prior),
which is run first and saved beside the pipeline, so that the scoring rows load it.  Times are
of the call alone (loading the pipeline is not in them), one run each, no warm-up (a real-size
call takes minutes).  The semantic scores use ``flatten_pixels`` features: a CLIP or Inception
extractor at real size is not run here, so its cost (one pass over M+1 images per scored image,
at each ``x0_steps`` step for ``semantic_x0``) is excluded; the VAE decodes are included.
``--tiny`` runs the same rows on tiny configs, in seconds.

Usage:  OMP_NUM_THREADS=1 python benchmarks/bench_real_size.py [--model sd15|dit|both] [--steps 2]
            [--draws 5] [--x0-draws 16] [--rows fit plain variability semantic_x0 semantic] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large_heads import DIT_XL2, SD15  # noqa: E402

ROWS = ("fit", "plain", "variability", "semantic_x0", "semantic")
PROMPT = "a cat"

#: Stable Diffusion's AutoencoderKL (SD 1.x and 2.x, and the VAE DiT-XL/2 was trained with)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=512,
              scaling_factor=0.18215)
#: SD 1.5's text encoder (openai/clip-vit-large-patch14's text tower)
SD15_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
#: SD 1.5's scheduler config, and DiT's betas, for DDIM
SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                 steps_offset=1)
DIT_DDIM = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                clip_sample=False)

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                 attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1, norm_num_groups=4, sample_size=16)
TINY_CLIP = dict(vocab_size=49408, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=2, max_position_embeddings=77, projection_dim=16)
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                num_layers=1, sample_size=8, patch_size=2, norm_num_groups=4, num_embeds_ada_norm=1000)


def folder_of(args: argparse.Namespace, model: str) -> Path:
    return Path(args.cache) / (model + ("_tiny" if args.tiny else ""))


def _tokenizer(folder: Path) -> Any:
    """The tests' letters-only CLIPTokenizer (tests/test_from_pipe.py) at SD's 77-token prompts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_from_pipe import _clip_tokenizer

    return _clip_tokenizer(folder, max_length=77)


def build(model: str, tiny: bool, folder: Path) -> dict[str, Any]:
    """Build the random-weight pipeline (seed 0) and save it to `folder`."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).eval()
    if model == "sd15":
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15)).eval()
        text = CLIPTextModel(CLIPTextConfig(**(TINY_CLIP if tiny else SD15_CLIP), bos_token_id=0,
                                            eos_token_id=1, pad_token_id=1)).eval()
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text,
                                       tokenizer=_tokenizer(folder / "_vocab"),
                                       scheduler=DDIMScheduler(**SD15_DDIM), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        parts = {"unet": unet, "vae": vae, "text_encoder": text}
    else:
        transformer = DiTTransformer2DModel(**(TINY_DIT if tiny else DIT_XL2)).eval()
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**DIT_DDIM))
        parts = {"transformer": transformer, "vae": vae}
    pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_vocab", ignore_errors=True)
    return {f"{k}_params": sum(p.numel() for p in v.parameters()) for k, v in parts.items()}


def load(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one row in this process; its wall seconds, peak RSS and what it produced."""
    from genunc.features import flatten_pixels
    from genunc.pipelines import ImageUncertaintyPipeline
    from genunc.posterior import POSTERIOR_DIR

    folder = folder_of(args, args.model)
    if row == "build":
        start = time.perf_counter()
        info = build(args.model, args.tiny, folder)
        return {"row": row, "seconds": time.perf_counter() - start, "peak_mb": _rss_mb(), **info}
    start = time.perf_counter()
    pipe = load(folder)
    load_s, loaded_mb = time.perf_counter() - start, _rss_mb()
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=flatten_pixels)
    saved = folder / POSTERIOR_DIR
    sd = args.model == "sd15"
    latent = upipe.model.config.sample_size
    scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # DiTPipeline has no vae_scale_factor
    size = (latent if isinstance(latent, int) else latent[0]) * scale
    labels = list(range(args.labels))
    call = (dict(prompt=[PROMPT], guidance_scale=7.5) if sd else
            dict(class_labels=labels, guidance_scale=4.0))
    call.update(num_inference_steps=args.steps, output_type="np")
    result: dict[str, Any] = {"row": row, "load_s": load_s, "loaded_mb": loaded_mb,
                              "size": size}
    if row == "fit":
        g = torch.Generator().manual_seed(1)
        images = torch.rand(args.fit_images, 3, size, size, generator=g) * 2 - 1
        conditions = [PROMPT] * args.fit_images if sd else [i % 1000 for i in range(args.fit_images)]
        shutil.rmtree(saved, ignore_errors=True)
        start = time.perf_counter()
        post = upipe.load_or_fit_posterior(saved, (images, conditions),
                                           batch_size=args.fit_batch, progress=False)
        result["seconds"] = time.perf_counter() - start
        summary = post.summary()
        result.update(prior_precision=float(summary["prior_precision"]),
                      head=upipe.adapter.head_name,
                      head_params=sum(p.numel() for p in upipe.adapter.head.parameters()))
    elif row == "plain":
        start = time.perf_counter()
        pipe(generator=torch.Generator().manual_seed(args.seed), **call)
        result["seconds"] = time.perf_counter() - start
    else:
        if upipe.load_or_fit_posterior(saved) is None:
            raise SystemExit(f"no posterior in {saved}: run the fit row first")
        draws = {"variability": 0, "semantic_x0": args.x0_draws, "semantic": args.draws}[row]
        start = time.perf_counter()
        out = upipe(generator=torch.Generator().manual_seed(args.seed), seed=args.seed,
                    num_draws=draws, scores=(row,), progress=False, **call)
        result["seconds"] = time.perf_counter() - start
        result.update(draws=draws, score=[float(v) for v in out.scores[row]],
                      timings={k: float(v) for k, v in out.timings.items()})
    result["peak_mb"] = _rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", choices=("sd15", "dit", "both"), default="both")
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (2-4 on a CPU)")
    parser.add_argument("--draws", type=int, default=5, help="M of the full semantic score")
    parser.add_argument("--x0-draws", type=int, default=16, help="M of semantic_x0")
    parser.add_argument("--labels", type=int, default=1, help="DiT: class labels in the call")
    parser.add_argument("--fit-images", type=int, default=8, help="random images the posterior is fitted on")
    parser.add_argument("--fit-batch", type=int, default=4, help="images per batch of the fit")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a check, in seconds)")
    parser.add_argument("--rebuild", action="store_true", help="build and save the pipelines again")
    parser.add_argument("--cache", default="outputs/bench_real_size", help="where the pipelines are saved")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return

    def spawn(model: str, row: str) -> dict[str, Any] | str:
        cmd = [sys.executable, __file__, "--one", row, "--model", model, *_passed(args)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return f"> {args.timeout} s (stopped)"
        if done.returncode != 0:
            return "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return json.loads(done.stdout.strip().splitlines()[-1])

    models = ("dit", "sd15") if args.model == "both" else (args.model,)
    started = time.perf_counter()
    print(f"from_pipe at {'tiny' if args.tiny else 'real'} sizes, random weights, CPU "
          f"({torch.get_num_threads()} threads), {args.steps} DDIM steps, one run per row, no warm-up; "
          "features: flatten_pixels")
    table = ["| model | row | M | wall s | × plain | peak RSS MB | over plain's peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model in models:
        folder = folder_of(args, model)
        if args.rebuild or not (folder / "model_index.json").exists():
            r = spawn(model, "build")
            if isinstance(r, str):
                print(f"{model}: build {r}")
                continue
            print(f"{model}: built and saved to {folder} in {r['seconds']:.0f} s "
                  f"({', '.join(f'{k} {v:,}' for k, v in r.items() if k.endswith('_params'))})")
        rows = list(args.rows)
        from genunc.posterior import POSTERIOR_DIR
        if "fit" not in rows and not (folder / POSTERIOR_DIR).exists():
            rows.insert(0, "fit")  # the scoring rows load the posterior the fit saves
        plain = plain_mb = None
        name = {"sd15": "SD 1.5", "dit": "DiT-XL/2"}[model] + (" (tiny)" if args.tiny else "")
        for row in sorted(rows, key=ROWS.index):
            r = spawn(model, row)
            if isinstance(r, str):
                table.append(f"| {name} | {row} | | {r} | | | |")
                print(f"{model} {row}: {r}", flush=True)
                continue
            print(f"{model} {row}: " + json.dumps(r), flush=True)
            plain, plain_mb = (r["seconds"], r["peak_mb"]) if row == "plain" else (plain, plain_mb)
            ratio = f"{r['seconds'] / plain:.2f}" if plain and row not in ("fit", "plain") else \
                ("1.00" if row == "plain" else "")
            label = {"fit": f"fit_posterior ({args.fit_images} images of {r['size']} px, diag)",
                     "plain": f"plain `pipe(...)` ({r['size']} px)",
                     "variability": "`variability` (exact)"}.get(row, f"`{row}`")
            table.append(f"| {name} | {label} | {r.get('draws', '')} | {_secs(r['seconds'])} | {ratio} "
                         f"| {r['peak_mb']:,.0f} | {_over(r['peak_mb'], plain_mb, row)} |")
    print()
    print("\n".join(table))
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")


def _over(peak: float, plain: float | None, row: str) -> str:
    return "" if plain is None or row == "plain" else f"{peak - plain:+,.0f}"


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a row process needs, as given to the parent."""
    out = ["--steps", str(args.steps), "--draws", str(args.draws), "--x0-draws", str(args.x0_draws),
           "--labels", str(args.labels), "--fit-images", str(args.fit_images),
           "--fit-batch", str(args.fit_batch), "--seed", str(args.seed), "--cache", args.cache]
    return out + (["--tiny"] if args.tiny else [])


if __name__ == "__main__":
    main()
