"""Score the images of a Stable Diffusion (or SD3, PixArt, DiT...) checkpoint you already have.

    python examples/stable_diffusion.py path/to/checkpoint --prompts "a red bus" "a cat" \\
        --fit-images my_images/ --num-draws 5 --out scored/

The wrap is three lines:

    pipe = DiffusionPipeline.from_pretrained(path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=features, posterior=post)
    out = upipe(prompt=prompts, generator=g, num_draws=5)    # out.images, out.scores

The head posterior is loaded from ``<checkpoint>/genunc_posterior`` when it was saved there;
otherwise it is fitted on ``--fit-images`` (a folder of images; ``captions.txt`` beside them,
one caption per image in sorted file order) and saved there.  The semantic score embeds images
with CLIP when ``--clip`` names a local CLIP checkpoint, and raw pixels otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from genunc.features import ClipFeatures, flatten_pixels
from genunc.pipelines import ImageUncertaintyPipeline
from genunc.posterior import POSTERIOR_DIR, HeadPosterior

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def read_images(folder: Path, size: int) -> tuple[torch.Tensor, list[str] | None]:
    """Images resized to the model's resolution, in [-1, 1], and their captions if given."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not files:
        raise SystemExit(f"no images in {folder}")
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), dtype=np.float32)
              for p in files]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) / 127.5 - 1
    captions_file = folder / "captions.txt"
    captions = captions_file.read_text().splitlines() if captions_file.exists() else None
    if captions is not None and len(captions) != len(files):
        raise SystemExit(f"{len(files)} images but {len(captions)} captions in {captions_file}")
    return images, captions


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a diffusers pipeline folder")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--num-draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-images", type=Path, default=None)
    parser.add_argument("--clip", type=Path, default=None, help="local CLIP checkpoint")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.model).to(args.device)
    features = ClipFeatures(args.clip, device=args.device) if args.clip else flatten_pixels
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=features)
    saved = args.model / POSTERIOR_DIR
    upipe.posterior = HeadPosterior.load(saved, upipe.model, missing="none")
    if upipe.posterior is None:
        if args.fit_images is None:
            raise SystemExit(f"no posterior in {saved}: pass --fit-images to fit one")
        size = args.height or pipe.vae_scale_factor * _latent_size(upipe.model)
        images, captions = read_images(args.fit_images, size)
        upipe.fit_posterior(images, prompts=captions).save(saved)

    sizes = {k: v for k, v in (("height", args.height), ("width", args.width)) if v}
    out = upipe(prompt=list(args.prompts), num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, num_draws=args.num_draws,
                generator=torch.Generator().manual_seed(args.seed), seed=args.seed,
                scores=("semantic", "variability", "pixel_variance"), **sizes)

    args.out.mkdir(parents=True, exist_ok=True)
    scores = {name: values.tolist() for name, values in out.scores.items()}
    with open(args.out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "prompt", *scores])
        for i, (image, prompt) in enumerate(zip(out.images, args.prompts, strict=True)):
            name = f"{i:04d}.png"
            image.save(args.out / name)
            writer.writerow([name, prompt, *(scores[k][i] for k in scores)])
    (args.out / "scores.json").write_text(json.dumps(scores, indent=1))
    for prompt, *values in zip(args.prompts, *scores.values(), strict=True):
        print(prompt, " ".join(f"{k}={v:.4g}" for k, v in zip(scores, values, strict=True)))
    return scores


def _latent_size(denoiser: torch.nn.Module) -> int:
    size = denoiser.config.sample_size
    return size if isinstance(size, int) else size[0]


if __name__ == "__main__":
    main()
