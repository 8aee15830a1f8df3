"""EDM with a block posterior: the last EGNN block(s) and the head (``tail=k``), so that the
position noise is uncertain too (issue 31).

The model is the EDM conformance fixture's small configuration (``fixtures/edm_reference.pt``,
see ``test_edm.py``: 2 layers, nf 16, weights perturbed so that the coordinate MLPs matter).
"""

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genunc.adapters.edm import EDMAdapter
from genunc.adapters.molecule import PointCloudLayout
from genunc.errors import ConfigError, GenuncError
from genunc.posterior import TailPosterior
from genunc.posterior.variance import MonteCarloTailVariance
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.streams import randn_rows
from genunc.zoo.edm import load_edm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from molecule_folders import (  # noqa: E402  (the EDM folder helpers)
    edm_folder,
    reference_fixture,
    run_filter_example,
    run_molecule_job,
)
from test_edm import FIXTURE, _rotation, _small  # noqa: E402  (its fixture helpers)

BLOCK = ["dynamics.egnn.e_block_1", "dynamics.egnn.embedding_out", "dynamics.readout"]

ref = reference_fixture(FIXTURE)


def _batch(adapter, n=4, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(width)[None] < torch.tensor([7, 6, 4, 5, 3, 7][:n])[:, None]
    x = adapter.layout.encode((torch.randn(n, width, 3, generator=g) * 1.5).numpy(),
                              torch.randint(0, 5, (n, width), generator=g).numpy(), mask.numpy())
    return {"x": x.to(adapter.dtype), "node_mask": mask}


@pytest.fixture(scope="module")
def fitted(ref):
    """A float64 block posterior over the last block, fitted on EDM's own noisy pairs."""
    adapter = EDMAdapter(_small(ref, torch.float64), PointCloudLayout(5))
    posterior = TailPosterior.fit(adapter, [_batch(adapter), _batch(adapter, seed=1)], tail=1,
                                  repeats=2)
    return adapter, posterior


def _inputs(ref, dtype=torch.float64):
    s = ref["small"]
    return (s["xh"].to(dtype), s["node_mask"].squeeze(-1).bool(), torch.tensor([10, 400, 900]))


# ------------------------------------------------------------------ conformance of the re-run
@pytest.mark.parametrize("blocks", [1, 2])
def test_map_rerun_of_the_block_equals_the_edm_forward(ref, blocks):
    s = ref["small"]
    for dtype, tol, expected in ((torch.float32, 1e-5, s["out"]), (torch.float64, 1e-10, s["out64"])):
        model = _small(ref, dtype)
        assert model.tail_modules(1) == BLOCK
        from genunc.posterior.tail import Tail

        tail = Tail(model, model.tail_modules(blocks))
        args = [v.to(dtype) for v in (s["t"], s["xh"], s["node_mask"], s["edge_mask"])]
        with torch.no_grad(), tail.capture() as record:
            out = model(*args)
            inputs = tail.inputs_of(record, 3)
            rerun = tail.run(None, inputs)
        assert inputs.separable  # dense (B, N, N) edges: draws batch over trajectory groups
        assert (rerun - out).abs().max() <= tol
        assert (rerun - expected).abs().max() <= tol  # EDM's own _forward (reference code)


def test_the_block_fit_covers_positions_with_their_own_noise_scale(fitted):
    adapter, posterior = fitted
    assert posterior.names == BLOCK
    # the last block's coordinate MLP and GCL node/edge/attention MLPs, and the head
    keys = list(posterior.tail.param_shapes)
    for part in ("gcl_equiv.coord_mlp.0.weight", "gcl_equiv.coord_mlp.4.weight",
                 "gcl_0.node_mlp.0.weight", "gcl_0.edge_mlp.2.weight", "gcl_0.att_mlp.0.weight"):
        assert f"dynamics.egnn.e_block_1.{part}" in keys, part
    assert "dynamics.egnn.embedding_out.weight" in keys
    assert set(posterior.info["sigma_noise_groups"]) == {"positions", "features"}
    assert posterior.info["output_width"] == 7 * adapter.layout.width  # every atom, every channel


# ------------------------------------------------------------------ equivariance of every draw
def test_every_block_draw_keeps_the_model_e3_equivariant(ref, fitted):
    adapter, posterior = fitted
    draws = posterior.sample(4, seed=0, with_map=True)
    x, mask, t = _inputs(ref)
    rot, shift = _rotation(1), torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    moved = torch.cat([x[..., :3] @ rot.T + shift, x[..., 3:]], -1) * mask[..., None]
    tail = posterior.tail
    outputs = []
    for m in range(len(draws)):
        with torch.no_grad(), tail.swapped(draws.draw(m)):
            out, out_moved = adapter.denoise(x, t, mask), adapter.denoise(moved, t, mask)
        torch.testing.assert_close(out_moved[..., :3], out[..., :3] @ rot.T, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(out_moved[..., 3:], out[..., 3:], atol=1e-9, rtol=1e-9)
        outputs.append(out)
    # the batched re-run of all draws on recorded inputs is equivariant too
    reruns = []
    for value in (x, moved):
        with torch.no_grad(), tail.capture() as record:
            adapter.denoise(value, t, mask)
            reruns.append(draws.apply(tail.inputs_of(record, 3)))
    torch.testing.assert_close(reruns[1][..., :3], reruns[0][..., :3] @ rot.T, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(reruns[1][..., 3:], reruns[0][..., 3:], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(reruns[0], torch.stack(outputs), atol=1e-10, rtol=1e-10)
    # the draws move positions as well as features (the head alone moves features only)
    for part in (slice(0, 3), slice(3, None)):
        assert (outputs[1][..., part] - outputs[0][..., part]).abs().max() > 1e-4


# ------------------------------------------------------------------ variability
def test_position_variability_is_the_monte_carlo_of_whole_model_runs(ref, fitted):
    """The pipeline's variance (the block re-run under M draws on the MAP's recorded block
    inputs) is the sample variance of M whole-model runs with each draw's weights swapped in.

    Both compute the same float64 arithmetic; they differ only in how vmap batches the draws,
    so they agree to rounding (rtol 1e-9: float64 rounding of outputs of size ~1e1, squared and
    differenced over 5 draws, stays below 1e-12 relative; 1e-9 leaves room for op reordering)."""
    adapter, posterior = fitted
    draws = posterior.sample(5, seed=3, with_map=True)[1:]
    x, mask, t = _inputs(ref)
    variance = MonteCarloTailVariance(adapter, draws)
    with torch.no_grad(), posterior.tail.capture() as record:
        adapter.denoise(x, t, mask)
        estimate = variance(posterior.tail.inputs_of(record, 3), {"x": x, "node_mask": mask})
        whole = []
        for m in range(len(draws)):
            with posterior.tail.swapped(draws.draw(m)):
                whole.append(adapter.denoise(x, t, mask))
    whole = torch.stack(whole).double()
    assert estimate.shape == (1 + 5, 3, 7, 9)  # the variance, then 5 leave-one-out replicates
    torch.testing.assert_close(estimate[0], whole.var(0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(estimate[1], whole[1:].var(0), rtol=1e-9, atol=1e-12)
    parts = adapter.reduce_variance(estimate[0], {"node_mask": mask})
    assert (parts["variability_pos"] > 0).all() and (parts["variability_type"] > 0).all()
    torch.testing.assert_close(parts["variability"], parts["variability_pos"] + parts["variability_type"])


def test_linearised_position_variance_is_exact_for_the_linear_part_and_is_monte_carlos(ref, fitted):
    """The first-order closed form ``diag(J S J^T)`` under the diagonal block posterior:

    * exact for the linear part: it equals the diagonal of ``J S J^T`` from full Jacobians;
    * it is what Monte Carlo of the linearised draws converges to (1,500 draws: the relative
      standard error of a sample variance is sqrt(2/M) = 3.7%, the check allows 15%);
    * at small posterior width it is the Monte-Carlo variance of re-run draws: draws shrunk
      towards the MAP by s = 1e-3 give var / s^2 within 1% of the linearised variance of the
      same (unshrunk) draws, a difference of order s."""
    adapter, posterior = fitted
    x, mask, t = _inputs(ref)
    tail = posterior.tail
    with torch.no_grad(), tail.capture() as record:
        adapter.denoise(x, t, mask)
        inputs = tail.inputs_of(record, 3)
    closed = posterior.linearised_output_variance(inputs, chunk=50)
    assert closed.shape == (3, 7, 9) and closed[..., :3].sum() > 0
    keys = list(tail.param_shapes)
    own = tail.parameters()
    primals = tuple(own[k].detach() for k in keys)
    jacobians = torch.func.jacrev(lambda *p: tail.run(dict(zip(keys, p)), inputs),
                                  argnums=tuple(range(len(keys))))(*primals)
    variance = tail.split_flat(posterior.posterior_variance.unsqueeze(0))
    exact = sum((j.reshape(*closed.shape, -1).square() * variance[k][0].reshape(-1)).sum(-1)
                for j, k in zip(jacobians, keys))
    torch.testing.assert_close(closed, exact, rtol=1e-10, atol=1e-14)
    # Monte Carlo of linearised draws
    lin = copy.copy(posterior)
    lin.info = dict(posterior.info)
    lin.predictive = "linearised"
    many = lin.sample(1500, seed=5)
    with torch.no_grad():
        spread = many.apply(inputs).var(0)
    per_molecule = (closed * mask[..., None]).sum((1, 2))
    torch.testing.assert_close((spread * mask[..., None]).sum((1, 2)), per_molecule, rtol=0.15, atol=0)
    # re-run draws at small width: the same draws, shrunk towards the MAP
    draws = posterior.sample(64, seed=6)
    s = 1e-3
    small = {k: own[k].detach() + s * (v - own[k].detach()) for k, v in draws.params.items()}
    with torch.no_grad():
        rerun = tail.apply(small, inputs).var(0) / s**2
    linear = tail.apply_linearised(draws.params, inputs).var(0).detach()
    for part in (slice(0, 3), slice(3, None)):  # positions, then types
        torch.testing.assert_close((rerun[..., part] * mask[..., None]).sum((1, 2)),
                                   (linear[..., part] * mask[..., None]).sum((1, 2)), rtol=1e-2, atol=0)


# ------------------------------------------------------------------ the user path
def _folder_pipe(tmp_path):
    from genunc.pipelines import MoleculeUncertaintyPipeline

    pipe = MoleculeUncertaintyPipeline.from_pretrained(edm_folder(tmp_path / "edm", n_layers=2))
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(9)[None] < torch.tensor([9, 7, 5, 8])[:, None]
    batch = {"x": pipe.adapter.layout.encode((torch.randn(4, 9, 3, generator=g) * 1.5).numpy(),
                                             torch.randint(0, 5, (4, 9), generator=g).numpy(),
                                             mask.numpy()), "node_mask": mask}
    return pipe, [batch]


def test_pipeline_block_posterior_scores_positions_and_semantic_generations(tmp_path):
    pipe, batches = _folder_pipe(tmp_path)
    pipe.load_or_fit_posterior(tmp_path / "posterior", batches, tail=1, progress=False)
    assert isinstance(pipe.posterior, TailPosterior) and pipe.posterior.names == BLOCK
    kwargs = dict(num_draws=3, num_inference_steps=4, seed=2, progress=False, chunk_size=2)
    out = pipe(3, scores=("variability", "semantic"), variance="monte_carlo", **kwargs)
    for name in ("variability", "variability_pos", "variability_type", "variability_se",
                 "variability_pos_se", "variability_type_se", "semantic"):
        assert out.scores[name].shape == (3,) and np.isfinite(out.scores[name]).all(), name
    assert (out.scores["variability_pos"] > 0).all() and (out.scores["variability_pos_se"] > 0).all()
    # the semantic score's generations are those of the model with each draw's block weights
    request = pipe._request(("semantic",), 3, 2, num_samples=3)
    masks = pipe._masks(request, None)
    noise = randn_rows((masks.shape[1], pipe.adapter.layout.width), request.generators("initial_noise"))
    x_T = pipe.adapter.project(noise, {"node_mask": masks})
    scheduler = pipe.adapter.make_scheduler("edm")
    for m in (1, 3):
        with torch.no_grad(), pipe.posterior.tail.swapped(request.draws.draw(m)):
            alone = run_trajectory(pipe.adapter, scheduler, x_T, {"node_mask": masks},
                                   num_inference_steps=4,
                                   generator=request.generators("sampler_noise")).samples
        positions, types = pipe.adapter.layout.decode(alone, masks)[1]
        drawn_positions, drawn_types = out.draw_molecules[m - 1][1]
        np.testing.assert_allclose(drawn_positions, positions, rtol=1e-5, atol=1e-4)  # float32
        np.testing.assert_array_equal(drawn_types, types)
    # the MAP molecules are the plain model's (up to float32 rounding: the MAP rows run in a
    # batch of M+1 trajectory groups, its block re-run batched by vmap); reloaded, the
    # posterior gives the same scores
    plain = pipe(3, scores=("random",), **kwargs)
    for (pa, ta), (pb, tb) in zip(out.molecules, plain.molecules):
        np.testing.assert_allclose(pa, pb, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(ta, tb)
    again, _ = _folder_pipe(tmp_path)
    again.load_or_fit_posterior(tmp_path / "posterior", batches, tail=1)
    same = again(3, scores=("variability",), variance="monte_carlo", **kwargs)
    np.testing.assert_allclose(same.scores["variability_pos"], out.scores["variability_pos"],
                               rtol=1e-6)


def test_bad_block_requests_fail_in_one_line(tmp_path, ref):
    pipe, batches = _folder_pipe(tmp_path)
    with pytest.raises(ConfigError, match="2 EGNN blocks") as err:
        pipe.fit_posterior(batches, tail=3, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(GenuncError, match="at least 1"):
        pipe.fit_posterior(batches, tail=0, progress=False)
    pipe.fit_posterior(batches, tail=1, progress=False)
    with pytest.raises(GenuncError, match="monte_carlo") as err:
        pipe(2, num_draws=3, num_inference_steps=2, scores=("variability",), progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(GenuncError, match="num_draws >= 3"):
        pipe(2, num_draws=2, num_inference_steps=2, scores=("variability",),
             variance="monte_carlo", progress=False)
    # a block posterior refuses another model's weights
    from genunc.errors import FingerprintMismatchError

    with pytest.raises(FingerprintMismatchError):
        pipe.posterior.check_matches(_small(ref))


def test_the_molecule_job_fits_and_uses_a_block_posterior_on_an_edm_folder(qm9_slice, tmp_path):
    """``posterior.tail`` in a molecule job config, as for images and text."""
    export = run_molecule_job(edm_folder(tmp_path / "edm"), qm9_slice, tmp_path)
    assert len(export) == 3
    assert (np.asarray(export.column("variability_pos")) > 0).all()
    assert np.isfinite(np.asarray(export.column("variability_pos_se"))).all()


@pytest.mark.slow
def test_filter_molecules_example_takes_a_block_posterior(qm9_slice, tmp_path, repo, python_run):
    run = run_filter_example(python_run, repo, "--edm", edm_folder(tmp_path / "edm"), qm9_slice, tmp_path,
                             "--tail", "1", "--draws", "3")
    assert run.returncode == 0, run.stderr
    assert "(2 of 4 records)" in run.stdout
    from genunc.posterior import Posterior

    assert Posterior.load(tmp_path / "out" / "posterior", load_edm(tmp_path / "edm")).kind == "tail"
