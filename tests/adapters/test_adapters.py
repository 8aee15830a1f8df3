"""The adapter contract fits a posterior for all three output layouts genunc serves."""

import pytest
import torch

from genunc.adapters import MaskedTokenAdapter, NoisePredictionAdapter, TrainingPairs
from genunc.posterior import HeadPosterior, capture_head, collect_head_data
from genunc.zoo.toy import ToyImageDenoiser, ToyPointCloudDenoiser, ToyTokenDenoiser


def _image():
    model = ToyImageDenoiser(channels=2, width=8)
    return NoisePredictionAdapter(model, "conv_out"), [torch.randn(6, 2, 8, 8) for _ in range(3)]


def _point_cloud():
    model = ToyPointCloudDenoiser(n_features=7, width=16)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[:, 6:] = False  # three padded atoms per molecule
    mask[0, 3:] = False
    batch = {"x": torch.randn(5, 9, 7) * mask[..., None], "node_mask": mask,
             "cond": {"node_mask": mask}}
    return NoisePredictionAdapter(model, "head"), [batch, batch]


def _tokens():
    model = ToyTokenDenoiser(vocab_size=11, width=16, length=10)
    return MaskedTokenAdapter(model, "lm_head", mask_id=model.mask_id), \
        [torch.randint(0, 11, (4, 10)) for _ in range(3)]


LAYOUTS = {"image": _image, "point_cloud": _point_cloud, "tokens": _tokens}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_fit_sample_apply_for_each_layout(layout, structure):
    adapter, batches = LAYOUTS[layout]()
    post = HeadPosterior.fit(adapter, batches, repeats=2, structure=structure, progress=False)
    assert post.likelihood == adapter.likelihood
    assert post.prior_precision > 0 and torch.isfinite(torch.tensor(post.info["log_marglik"]))

    # one real forward: the MAP draw re-applied to the captured features reproduces the model
    pairs = adapter.training_pairs(batches[0], torch.Generator().manual_seed(0))
    with capture_head(adapter.head) as record, torch.no_grad():
        output = adapter.denoise(**pairs.inputs)
    features = record.require_single_call(adapter.head_name)
    draws = post.sample(3, seed=0)
    outs = adapter.post_head(draws.apply(features), pairs.inputs)
    mapped = adapter.post_head(post.sample(1, with_map=True)[0].apply(features), pairs.inputs)[0]
    if layout == "point_cloud":  # the toy model zeroes padded nodes after its head
        mapped = mapped * pairs.mask[..., None]
    torch.testing.assert_close(mapped, output, rtol=1e-5, atol=1e-5)
    assert outs.shape == (3, *output.shape)
    assert not torch.allclose(outs[0], outs[1])


def test_rows_follow_the_layout():
    adapter, batches = _point_cloud()
    data = collect_head_data(adapter, batches, progress=False)
    real_atoms = int(batches[0]["node_mask"].sum()) * len(batches)
    assert data.features.shape == (real_atoms, 16) and data.targets.shape == (real_atoms, 7)

    adapter, batches = _image()
    data = collect_head_data(adapter, batches, repeats=2, progress=False)
    assert data.features.shape == (36, 8, 8, 8) and data.targets.shape == (36, 2 * 8 * 8)

    adapter, batches = _tokens()
    data = collect_head_data(adapter, batches, seed=0, progress=False)
    generator = torch.Generator().manual_seed(0)
    masked = sum(int(adapter.training_pairs(b, generator).mask.sum()) for b in batches)
    assert data.features.shape == (masked, 16) and data.targets.dtype == torch.long


def test_max_rows_and_seed_make_collection_reproducible():
    adapter, batches = _image()
    a = collect_head_data(adapter, batches, max_rows=10, seed=3, progress=False)
    b = collect_head_data(adapter, batches, max_rows=10, seed=3, progress=False)
    c = collect_head_data(adapter, batches, max_rows=10, seed=4, progress=False)
    assert len(a) == 10
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    assert not torch.allclose(a.features, c.features)


def test_custom_adapter_only_needs_two_methods():
    """The contract in full: denoise + training_pairs (+ likelihood, head name)."""
    from genunc.adapters import DenoiserAdapter

    class MyAdapter(DenoiserAdapter):
        def denoise(self, x, t):
            return self.model(x, t)

        def training_pairs(self, batch, generator):
            t = torch.randint(0, 1000, (batch.shape[0],), generator=generator)
            eps = torch.randn(batch.shape, generator=generator)
            return TrainingPairs(inputs={"x": batch + eps, "t": t}, target=eps)

    adapter = MyAdapter(ToyImageDenoiser(channels=1, width=4), "conv_out")
    post = HeadPosterior.fit(adapter, [torch.randn(4, 1, 6, 6)], progress=False)
    assert post.n_data == 4
