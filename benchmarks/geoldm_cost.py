"""What uncertainty costs on GeoLDM's full-size QM9 model: CPU seconds per molecule.

    python benchmarks/geoldm_cost.py --n 4 --steps 5 --draws 5 --tail 1

GeoLDM's counterpart of ``edm_cost.py`` (whose options, folder writer and timing loop it
reuses): builds the architecture of GeoLDM's released QM9 model (latent EDM dynamics with
n_layers 9, nf 256, latent_nf 2; the VAE's one-block encoder and 9-block decoder; random
weights, since the released ones are not shipped) as a GeoLDM output folder in a temporary
directory, loads it with
``MoleculeUncertaintyPipeline.from_pretrained``, fits the head posterior (the latent dynamics'
``embedding_out``) on random molecules (encoded by the VAE, as GeoLDM trains), then times one
generation of ``--n`` molecules (padded to 29 atoms; decoding included) per setting: plain,
variability (closed form), variability over M head draws, the semantic score (M + 1
trajectories, each decoded); ``--tail k`` adds the block posterior over the last k latent EGNN
blocks.  Ratios are of this process's CPU seconds (one thread); wall seconds beside them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from edm_cost import (  # noqa: E402
    QM9_ARGS,
    cost_parser,
    time_block_settings,
    time_head_settings,
    timed_fit,
    write_folder,
)

from genunc.pipelines import MoleculeUncertaintyPipeline  # noqa: E402
from genunc.zoo.geoldm import GeoLDMConfig, GeoLDMModel  # noqa: E402

#: GeoLDM's QM9 command (README), with the released models' latent_nf 2
GEOLDM_ARGS = {**QM9_ARGS, "train_diffusion": True, "ae_path": None, "trainable_ae": True,
               "latent_nf": 2, "kl_weight": 0.01, "diffusion_loss_type": "l2"}


def main() -> None:
    parser = cost_parser(__doc__, "GeoLDM", 4, blocks="latent EGNN blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp), values=GEOLDM_ARGS,
                              build=lambda args: GeoLDMModel(GeoLDMConfig.from_namespace(args)))
        pipe = MoleculeUncertaintyPipeline.from_pretrained(folder)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    _, fit = timed_fit(pipe)
    print(f"GeoLDM QM9 architecture: {count(pipe.model):,} parameters (dynamics "
          f"{count(pipe.model.dynamics):,}, VAE {count(pipe.model.vae):,}), head "
          f"{pipe.adapter.head_name} ({count(pipe.adapter.head):,}); posterior fit on 16 encoded, "
          f"noised random molecules: {fit:.1f} s")
    base = time_head_settings(pipe, args)
    if args.tail:
        posterior, fit = timed_fit(pipe, tail=args.tail)
        print(f"block posterior over {posterior.names} ({posterior.n_params:,} parameters): fit {fit:.1f} s")
        time_block_settings(pipe, args, base)
    print("(per molecule, a generation holds one decoder pass per trajectory: with 1000 steps the "
          "per-step figure times 1000 dominates)")


if __name__ == "__main__":
    main()
