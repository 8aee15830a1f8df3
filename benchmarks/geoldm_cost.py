"""What uncertainty costs on GeoLDM's full-size QM9 model: CPU seconds per molecule.

    python benchmarks/geoldm_cost.py --n 4 --steps 5 --draws 5 --tail 1

GeoLDM's counterpart of ``edm_cost.py`` (whose timing loop it reuses): builds the architecture of
GeoLDM's released QM9 model (latent EDM dynamics with n_layers 9, nf 256, latent_nf 2; the VAE's
one-block encoder and 9-block decoder; random weights, since the released ones are not shipped)
as a GeoLDM output folder in a temporary directory, loads it with
``MoleculeUncertaintyPipeline.from_pretrained``, fits the head posterior (the latent dynamics'
``embedding_out``) on random molecules (encoded by the VAE, as GeoLDM trains), then times one
generation of ``--n`` molecules (padded to 29 atoms; decoding included) per setting: plain,
variability (closed form), variability over M head draws, the semantic score (M + 1
trajectories, each decoded); ``--tail k`` adds the block posterior over the last k latent EGNN
blocks.  Ratios are of this process's CPU seconds (one thread); wall seconds beside them.
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from edm_cost import QM9_ARGS, random_batches, run_settings  # noqa: E402

from genunc.pipelines import MoleculeUncertaintyPipeline  # noqa: E402
from genunc.zoo.geoldm import GeoLDMConfig, GeoLDMModel  # noqa: E402

#: GeoLDM's QM9 command (README), with the released models' latent_nf 2
GEOLDM_ARGS = {**QM9_ARGS, "train_diffusion": True, "ae_path": None, "trainable_ae": True,
               "latent_nf": 2, "kl_weight": 0.01, "diffusion_loss_type": "l2"}


def write_folder(path: Path, seed: int = 0) -> Path:
    args = argparse.Namespace(**GEOLDM_ARGS)
    (path / "args.pickle").write_bytes(pickle.dumps(args))
    torch.manual_seed(seed)
    torch.save(GeoLDMModel(GeoLDMConfig.from_namespace(args)).state_dict(), path / "generative_model_ema.npy")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=4, help="molecules per generation")
    parser.add_argument("--steps", type=int, default=5, help="sampler steps (GeoLDM: 1000)")
    parser.add_argument("--draws", type=int, default=5, help="posterior draws M")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    parser.add_argument("--tail", type=int, default=0,
                        help="also time a block posterior over the last TAIL latent EGNN blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        pipe = MoleculeUncertaintyPipeline.from_pretrained(write_folder(Path(tmp)))
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    start = time.perf_counter()
    pipe.fit_posterior(random_batches(pipe, 2, 8), progress=False)
    fit = time.perf_counter() - start
    print(f"GeoLDM QM9 architecture: {count(pipe.model):,} parameters (dynamics "
          f"{count(pipe.model.dynamics):,}, VAE {count(pipe.model.vae):,}), head "
          f"{pipe.adapter.head_name} ({count(pipe.adapter.head):,}); posterior fit on 16 encoded, "
          f"noised random molecules: {fit:.1f} s")
    print(f"CPU, {args.threads} thread(s); {args.n} molecules padded to 29 atoms, {args.steps} steps, "
          f"M = {args.draws}, sampler {pipe.adapter.default_sampler}; median of {args.repeats} run(s)")
    settings = [("plain", dict(scores=())),
                ("variability (closed form)", dict(scores=("variability",))),
                (f"variability ({args.draws} draws)", dict(scores=("variability",), variance="monte_carlo")),
                (f"semantic ({args.draws} + 1 trajectories)", dict(scores=("semantic",)))]
    pipe(args.n, num_inference_steps=1, progress=False, chunk_size=args.n, scores=())  # warm-up
    print(f"{'setting':<40} {'CPU s/mol':>10} {'CPU s/mol/step':>16} {'vs plain':>9} {'wall s/mol':>9}")
    base = run_settings(pipe, settings, args)
    if args.tail:
        start = time.perf_counter()
        posterior = pipe.fit_posterior(random_batches(pipe, 2, 8), tail=args.tail, progress=False)
        print(f"block posterior over {posterior.names} ({posterior.n_params:,} parameters): fit "
              f"{time.perf_counter() - start:.1f} s")
        block = [(f"block variability ({args.draws} draws)",
                  dict(scores=("variability",), variance="monte_carlo")),
                 (f"block semantic ({args.draws} + 1 trajectories)", dict(scores=("semantic",)))]
        run_settings(pipe, block, args, base)
    print("(per molecule, a generation holds one decoder pass per trajectory: with 1000 steps the "
          "per-step figure times 1000 dominates)")


if __name__ == "__main__":
    main()
