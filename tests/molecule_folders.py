"""EDM and GeoLDM output folders for the tests, as their reference codes write them: ``args.pickle``
(an argparse.Namespace) and ``generative_model_ema.npy`` (a torch.save'd state dict), here of
tiny random-weight models; with the pieces the EDM and GeoLDM tests share (a molecule batch, a
pickle that would run a command, the filter_molecules example on a folder).

The tests import it from their own directory (``sys.path.insert(0, <tests>)``; pytest runs
with ``--import-mode=importlib``).
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from genunc.zoo.edm import EDMModel
from genunc.zoo.edm_args import EDMConfig
from genunc.zoo.geoldm import GeoLDMConfig, GeoLDMModel

#: EDM's QM9 options at a tiny size (1 layer, nf 8)
EDM_ARGS = dict(model="egnn_dynamics", probabilistic_model="diffusion", n_layers=1, nf=8,
                inv_sublayers=1, attention=True, tanh=True, norm_constant=1, sin_embedding=False,
                condition_time=True, normalization_factor=1, diffusion_steps=1000,
                diffusion_noise_schedule="polynomial_2", diffusion_noise_precision=1e-5,
                normalize_factors=[1, 4, 10], include_charges=True, context_node_nf=0,
                conditioning=[], dataset="qm9", remove_h=False, exp_name="tiny")

#: GeoLDM's QM9 options at a tiny size (EDM's, with the latent and VAE ones, latent_nf 1)
GEOLDM_ARGS = {**EDM_ARGS, "train_diffusion": True, "ae_path": None, "trainable_ae": True,
               "latent_nf": 1, "kl_weight": 0.01, "aggregation_method": "sum",
               "diffusion_loss_type": "l2", "cuda": False, "ema_decay": 0.9999,
               "exp_name": "tiny_geoldm"}


def reference_fixture(path: Path):
    """A module-scoped fixture ``ref``: the numbers recorded from a reference code (``path``)."""
    @pytest.fixture(scope="module", name="ref")
    def ref():
        return torch.load(path, weights_only=True)

    return ref


def small_model(model: torch.nn.Module, ref: dict, dtype=torch.float32) -> torch.nn.Module:
    """``model`` with the reference's ``small`` state dict, in ``dtype``, in eval mode."""
    model.load_state_dict(ref["small"]["state_dict"])
    return model.to(dtype).eval()


def edm_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**EDM_ARGS, **overrides})


def geoldm_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{**GEOLDM_ARGS, **overrides})


def write_folder(path: Path, args: argparse.Namespace, state: dict) -> Path:
    """``args.pickle`` and ``generative_model_ema.npy`` in ``path`` (made if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.pickle").write_bytes(pickle.dumps(args))
    torch.save(state, path / "generative_model_ema.npy")
    return path


def edm_folder(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny EDM folder (``edm_args(**overrides)``), weights initialised under ``seed``."""
    args = edm_args(**overrides)
    torch.manual_seed(seed)
    return write_folder(path, args, EDMModel(EDMConfig.from_namespace(args)).state_dict())


def geoldm_folder(path: Path, seed: int = 0, **overrides) -> Path:
    """A tiny GeoLDM folder (``geoldm_args(**overrides)``), weights initialised under ``seed``,
    then shifted by 0.05 N(0, 1) so that the decoder's outputs vary."""
    args = geoldm_args(**overrides)
    torch.manual_seed(seed)
    model = GeoLDMModel(GeoLDMConfig.from_namespace(args))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "gamma.gamma":
                p.add_(torch.randn(p.shape) * 0.05)
    return write_folder(path, args, model.state_dict())


def random_state(state: dict, keep: tuple[str, ...]) -> dict:
    """``state`` with every tensor but ``keep`` replaced by 0.02 N(0, 1) (generator seed 0)."""
    g = torch.Generator().manual_seed(0)
    return {k: (v if k in keep else torch.randn(v.shape, generator=g) * 0.02) for k, v in state.items()}


def molecule_batch(pipe, seed: int = 0) -> dict:
    """Four random molecules of 9, 7, 5 and 8 atoms (padded to 9) in the pipeline's encoding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(9)[None] < torch.tensor([9, 7, 5, 8])[:, None]
    return {"x": pipe.adapter.layout.encode((torch.randn(4, 9, 3, generator=g) * 1.5).numpy(),
                                            torch.randint(0, 5, (4, 9), generator=g).numpy(), mask.numpy()),
            "node_mask": mask}


class Exploit:
    """Pickles as ``os.system("touch <marker>")``: a reader that runs it leaves the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def run_filter_example(python_run, repo: Path, flag: str, folder: Path, qm9_slice, tmp_path: Path,
                       *extra: str):
    """examples/filter_molecules.py on ``folder`` (``flag``: ``--edm`` or ``--geoldm``), its
    posterior fitted on the first 20 QM9 molecules: 4 molecules, 2 draws, 3 steps, keep half,
    output in ``tmp_path / "out"``; ``extra`` options come last (a repeated one wins)."""
    from genunc.data.qm9 import save_cache

    save_cache(qm9_slice.subset(range(20)), tmp_path / "molecules.npz")
    return python_run(
        [repo / "examples" / "filter_molecules.py", flag, folder,
         "--posterior-data", tmp_path / "molecules.npz", "--n-fit", "20", "--n", "4",
         "--draws", "2", "--steps", "3", "--keep", "0.5", "--out", tmp_path / "out", *extra],
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_molecule_job(folder: Path, qm9_slice, tmp_path: Path):
    """``genunc fit`` then ``genunc generate`` with ``folder`` as the model (both must exit 0):
    a block posterior (tail 1) on the first 12 QM9 molecules, then 3 molecules scored by
    Monte-Carlo variability (3 draws) and semantic; returns the export."""
    import yaml

    from genunc.cli import main
    from genunc.data.qm9 import save_cache
    from genunc.export import Export

    save_cache(qm9_slice.subset(range(12)), tmp_path / "molecules.npz")
    config = {"modality": "molecule", "model": str(folder), "features": "descriptors",
              "posterior": {"data": str(tmp_path / "molecules.npz"), "max_samples": 12,
                            "repeats": 1, "batch_size": 6, "tail": 1, "dir": str(tmp_path / "post")},
              "generate": {"n_samples": 3, "num_draws": 3, "steps": 3, "chunk_size": 2,
                           "variance": "monte_carlo", "scores": ["variability", "semantic"],
                           "out": str(tmp_path / "export")}}
    path = tmp_path / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    assert main(["generate", "-c", str(path)]) == 0
    return Export(tmp_path / "export")
