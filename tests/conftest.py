"""Shared fixtures: tiny untrained models of every modality, a QM9 slice, the arithmetic task.

Factories are fixtures that return a function, so a test can build several models with other
seeds or sizes.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


class PythonServer:
    """``run(argv, cwd=None, env=None, timeout=300)``: ``subprocess.run([sys.executable, *argv],
    capture_output=True, text=True)``, but forked from tests/python_server.py, which has the heavy
    imports done (see there for what is the same as a fresh interpreter and what is not)."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None

    def _server(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen(
                [sys.executable, str(REPO / "tests" / "python_server.py")], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, bufsize=1)
            assert json.loads(self._process.stdout.readline()) == {"ready": True}
        return self._process

    def run(self, argv: list[str], cwd: Path | str | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        server = self._server()
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"argv": [str(a) for a in argv], "cwd": str(cwd or os.getcwd()),
                       "env": dict(os.environ if env is None else env), "stdout": str(out),
                       "stderr": str(err)}
            server.stdin.write(json.dumps(request) + "\n")
            pid = json.loads(server.stdout.readline())["pid"]
            timer = threading.Timer(timeout, os.kill, (pid, 9))
            timer.start()
            try:
                code = json.loads(server.stdout.readline())["returncode"]
            finally:
                timer.cancel()
            if code == -9:
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()
            self._process.wait(timeout=30)


@pytest.fixture(scope="session")
def python_run():
    """``python_run(argv, cwd=None, env=None, timeout=300)``: run ``python *argv`` as a fresh
    process with the heavy imports already done (a CompletedProcess with text stdout/stderr)."""
    server = PythonServer()
    yield server.run
    server.close()


# ----------------------------------------------------------------------------------- images
def _tiny_unet(seed: int = 0, classes: int | None = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=classes,
    ).eval()


@pytest.fixture(scope="session")
def tiny_unet():
    """``tiny_unet(seed=0, classes=3)``: an untrained class-conditional 8x8 UNet2DModel."""
    return _tiny_unet


@pytest.fixture(scope="session")
def tiny_ddpm_folder(tmp_path_factory):
    """``tiny_ddpm_folder(path)``: a tiny UNet + DDPM scheduler saved as diffusers saves them."""

    def write(path: Path, seed: int = 0) -> Path:
        from diffusers import DDPMScheduler

        _tiny_unet(seed).save_pretrained(path)
        DDPMScheduler(num_train_timesteps=100).save_pretrained(path)
        return path

    return write


def _write_image_config(folder: Path, tiny_ddpm_folder, posterior_dir: str | None = None,
                        **generate) -> Path:
    import yaml

    model = tiny_ddpm_folder(folder / "model")
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(24, 1, 8, 8, generator=g).clamp(-1, 1),
                "class_labels": torch.randint(0, 3, (24,), generator=g)}, folder / "data.pt")
    config = {"model": str(model), "features": "pixels", "quality": None,
              "posterior": {"data": str(folder / "data.pt"), "repeats": 1, "dir": posterior_dir},
              "generate": {"n_samples": 6, "num_draws": 2, "steps": 3, "chunk_size": 4,
                           "scores": ["semantic", "variability", "random"],
                           "out": str(folder / "export"), **generate}}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def tiny_image_posterior(tmp_path_factory, tiny_ddpm_folder) -> Path:
    """The folder of the posterior ``genunc fit`` makes for the tiny image config, fitted once
    per test run (the model, its data and the fit are all seeded: every config gets the same)."""
    from genunc.cli import main

    folder = tmp_path_factory.mktemp("tiny_image_posterior")
    config = _write_image_config(folder, tiny_ddpm_folder, posterior_dir=str(folder / "posterior"))
    assert main(["fit", "-c", str(config)]) == 0
    return folder / "posterior"


@pytest.fixture
def tiny_image_config(tmp_path, tiny_ddpm_folder, tiny_image_posterior):
    """A config file for a tiny image model, its fit data and an export, all in tmp_path:
    ``tiny_image_config(posterior_dir=None, fitted=False, **generate_overrides)`` returns its
    path; ``fitted=True`` puts the session's posterior where the config looks for it (a test
    that is not about fitting does not fit again)."""

    def write(posterior_dir: str | None = None, fitted: bool = False, **generate) -> Path:
        path = _write_image_config(tmp_path, tiny_ddpm_folder, posterior_dir, **generate)
        if fitted:
            shutil.copytree(tiny_image_posterior,
                            posterior_dir or tmp_path / "model" / "genunc_posterior")
        return path

    return write


# ----------------------------------------------------------------------------------- molecules
@pytest.fixture(scope="session")
def qm9_slice():
    """The first 200 QM9 molecules, read straight from qm9pack's CSVs."""
    from genunc.data.qm9 import parse_csvs, qm9pack_data_dir

    return parse_csvs(qm9pack_data_dir(), limit=200, progress=False)


def _tiny_molecule_model(seed: int = 0, **config):
    from genunc.zoo.molecule_model import EquivariantDenoiser

    torch.manual_seed(seed)
    return EquivariantDenoiser(**{"n_features": 6, "scalars": 8, "vectors": 2, "n_layers": 1,
                                  "lmax": 1, **config})


@pytest.fixture(scope="session")
def tiny_molecule_model():
    """``tiny_molecule_model(seed=0, **config)``: an untrained one-layer e3nn denoiser."""
    return _tiny_molecule_model


@pytest.fixture(scope="session")
def tiny_molecule_folder(qm9_slice):
    """``tiny_molecule_folder(path, timesteps=40)``: a model folder as ``from_pretrained`` reads
    it, and ``path.parent / "molecules.npz"``, a molecule cache for posterior fits."""

    def write(path: Path, timesteps: int = 40) -> Path:
        from genunc.data.qm9 import save_cache

        _tiny_molecule_model().save_pretrained(path, timesteps=timesteps)
        (path / "atom_histogram.json").write_text(json.dumps(qm9_slice.atom_count_histogram()))
        save_cache(qm9_slice.subset(range(40)), path.parent / "molecules.npz")
        return path

    return write


# ----------------------------------------------------------------------------------- text
@pytest.fixture(scope="session")
def arith_task():
    from genunc.tasks import ArithmeticTask

    return ArithmeticTask("*", 2)


@pytest.fixture(scope="session")
def tiny_text_model():
    """``tiny_text_model(vocab_size, length, **kwargs)``: an untrained one-layer masked-diffusion
    transformer (d_model 16, 2 heads)."""
    from genunc.zoo.text_model import MaskedDiffusionTransformer

    def build(vocab_size: int, length: int, **kwargs):
        torch.manual_seed(0)
        return MaskedDiffusionTransformer(vocab_size, length, d_model=16, n_layers=1, n_heads=2,
                                          **kwargs).eval()

    return build
