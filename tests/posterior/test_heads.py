"""Batched application of M head draws equals a loop over draws; closed-form variances are exact."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from genunc.errors import FingerprintMismatchError, GenuncError
from genunc.posterior import Conv2dOps, GenericOps, HeadPosterior, LinearOps, head_ops_for

M = 5


def _random_params(head, m=M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(m, *p.shape, generator=g) for n, p in head.named_parameters()}


class TinyMLPHead(nn.Module):
    """A head that is not a single Linear/Conv2d: genunc falls back to vmap(functional_call)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


HEADS = [
    (nn.Linear(6, 3), (4, 6), LinearOps),
    (nn.Linear(6, 3, bias=False), (2, 7, 6), LinearOps),  # point cloud: (B, N, F)
    (nn.Conv2d(4, 3, 3, padding=1), (2, 4, 8, 8), Conv2dOps),
    (nn.Conv2d(4, 6, 3, stride=2, groups=2, bias=False), (2, 4, 9, 9), Conv2dOps),
    (nn.Conv2d(4, 2, 3, padding=2, dilation=2, padding_mode="reflect"), (3, 4, 7, 7), Conv2dOps),
    (nn.Conv2d(4, 2, 3, padding="same"), (3, 4, 6, 6), Conv2dOps),
    (TinyMLPHead(), (2, 5, 6), GenericOps),
]


@pytest.mark.parametrize("head,shape,ops_type", HEADS, ids=lambda v: getattr(v, "__name__", None))
@pytest.mark.parametrize("per_draw", [False, True])
def test_batched_apply_equals_loop(head, shape, ops_type, per_draw):
    ops = head_ops_for(head)
    assert type(ops) is ops_type
    params = _random_params(head)
    features = torch.randn((M, *shape) if per_draw else shape)
    batched = ops.apply(features, params, per_draw=per_draw)
    loop = torch.stack([
        functional_call(head, {k: v[m] for k, v in params.items()},
                        (features[m] if per_draw else features,))
        for m in range(M)
    ])
    assert batched.shape == loop.shape
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head,shape", [(h, s) for h, s, t in HEADS if t is not GenericOps])
def test_closed_form_output_variance_matches_jacobian(head, shape):
    """Var[f] = J diag(v) J^T exactly, checked against an autograd Jacobian."""
    features = torch.randn(shape)
    variances = {n: torch.rand(p.shape) for n, p in head.named_parameters()}
    ops = head_ops_for(head)
    closed = ops.output_variance(features, variances)
    params = dict(head.named_parameters())
    jac = jacrev(lambda p: functional_call(head, p, (features,)))(params)
    expected = sum(
        (jac[n].reshape(*closed.shape, -1) ** 2 * variances[n].reshape(-1)).sum(-1) for n in params
    )
    torch.testing.assert_close(closed, expected, rtol=1e-4, atol=1e-5)


def test_posterior_output_variance_agrees_with_sampling():
    head = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(64, 3, 6, 6)
    with torch.no_grad():
        y = head(x).flatten(1) + 0.3 * torch.randn(64, 72)
    post = HeadPosterior.fit_features(head, (x, y), prior_precision=1.0)
    feats = torch.randn(2, 3, 6, 6)
    draws = post.sample(4000, seed=0)
    mc = draws.apply(feats).var(0)
    torch.testing.assert_close(post.output_variance(feats), mc, rtol=0.1, atol=1e-4)


def test_map_draw_reproduces_head():
    head = nn.Linear(5, 3)
    x = torch.randn(30, 5)
    post = HeadPosterior.fit_features(head, (x, torch.randn(30, 3)), prior_precision=1.0)
    draws = post.sample(2, with_map=True)
    assert draws.with_map and not draws[1:].with_map and draws[:1].with_map
    torch.testing.assert_close(draws[0].apply(x)[0], head(x).detach())


def test_recentre_moves_the_mean_onto_the_trained_head_and_keeps_the_variances():
    head = nn.Linear(5, 3)
    x = torch.randn(30, 5)
    post = HeadPosterior.fit_features(head, (x, torch.randn(30, 3)), prior_precision=1.0)
    before, old_sha = post.posterior_variance.clone(), post.fingerprint["weights_sha256"]
    with torch.no_grad():
        head.weight.add_(0.5)  # the head trains on after the fit
    model = nn.Module()
    model.head = head
    with pytest.raises(FingerprintMismatchError, match="head weights differ"):
        post.check_matches(model)
    post.recentre(head)
    post.check_matches(model)
    assert post.fingerprint["weights_sha256"] != old_sha
    torch.testing.assert_close(post.posterior_variance, before)
    draws = post.sample(2, with_map=True)
    torch.testing.assert_close(draws[0].apply(x)[0], head(x).detach())
    with pytest.raises(GenuncError, match="weights"):
        post.recentre(nn.Linear(4, 3))


def test_same_seed_same_draws_different_seed_different_draws():
    head = nn.Linear(5, 3)
    x = torch.randn(30, 5)
    post = HeadPosterior.fit_features(head, (x, torch.randn(30, 3)))
    a, b, c = post.sample(4, seed=7), post.sample(4, seed=7), post.sample(4, seed=8)
    torch.testing.assert_close(a.flat, b.flat, rtol=0, atol=0)
    assert not torch.allclose(a.flat, c.flat)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(post.sample(2, seed=g1).flat, post.sample(2, seed=g2).flat)


def _e3nn_head():
    from e3nn import o3

    return o3.Linear("4x0e + 2x1o", "1x1o + 3x0e"), (40, 10)  # 4 scalars + 2 vectors in


@pytest.mark.parametrize("make", [
    lambda: (nn.Linear(5, 3), (64, 5)),
    lambda: (nn.Conv2d(3, 2, 3, padding=1), (16, 3, 5, 5)),
    _e3nn_head,
], ids=["linear", "conv2d", "e3nn"])
@pytest.mark.parametrize("with_post", [False, True], ids=["head", "head+centring"])
def test_closed_form_variance_equals_monte_carlo_within_its_error(make, with_post):
    """Var of the (post-processed) head output under the diagonal posterior: the closed form
    agrees with the variance of 4,000 draws to within four of that estimate's standard errors."""
    head, shape = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y = head(x)
    post = HeadPosterior.fit_features(head, (x, (y + 0.3 * torch.randn_like(y)).flatten(1)
                                             if isinstance(head, nn.Conv2d) else y
                                             + 0.3 * torch.randn_like(y)), prior_precision=1.0)

    def centre(out):  # a linear map that mixes rows (centre of mass over the batch axis)
        return out - out.mean(-2 if out.dim() > 3 else -1, keepdim=True)

    feats = x[:8]
    transform = centre if with_post else None
    exact = post.output_variance(feats, transform).double()
    n = 4000
    outs = post.sample(n, seed=0).apply(feats)
    mc = (transform(outs) if transform else outs).double().var(0)
    tolerance = 4 * exact * (2 / (n - 1)) ** 0.5 + 1e-7
    assert ((exact - mc).abs() <= tolerance).float().mean() > 0.995  # rare 4-sigma outliers only


def test_closed_form_variance_refuses_a_head_that_is_not_linear_in_its_weights():
    head = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(32, 4)
    with torch.no_grad():
        y = head(x)
    post = HeadPosterior.fit_features(head, (x, y + 0.1 * torch.randn_like(y)), prior_precision=1.0)
    with pytest.raises(GenuncError, match="not: estimate the variance from draws"):
        post.output_variance(x)


def test_reported_perturbation_leaves_out_classes_no_target_named():
    """Rows of classes without data stay at the prior (wide); they must not inflate the
    reported size of a draw's step."""
    head = nn.Linear(4, 6)
    x, y = torch.randn(300, 4), torch.randint(0, 4, (300,))  # classes 4 and 5 never occur
    post = HeadPosterior.fit_features(head, (x, y), likelihood="classification",
                                      unseen_classes="prior")
    summary = post.summary()
    assert summary["classes_without_data"] == 2
    rows = post.ops.output_rows()
    seen = rows < 4
    var, mean = post.posterior_variance, post.mean
    expected = float(var[seen].sum().sqrt() / mean[seen].norm())
    assert summary["relative_perturbation"] == pytest.approx(expected)
    assert summary["relative_perturbation_all_weights"] == pytest.approx(
        float(var.sum().sqrt() / mean.norm()))
    assert (var[~seen].mean() > var[seen].mean())  # the unseen rows are the wide ones


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_frozen_unseen_classes_stay_at_their_weights_and_leave_the_rest_unchanged(structure):
    """Rows of classes no target names are kept at their pretrained values: draws never move
    them, their variance is zero, and the rows that saw data get the same curvature as when the
    unseen rows are in the posterior (a softmax couples rows only through the probabilities)."""
    head = nn.Linear(4, 6)
    x, y = torch.randn(300, 4), torch.randint(0, 4, (300,))  # classes 4 and 5 never occur
    frozen = HeadPosterior.fit_features(head, (x, y), likelihood="classification",
                                        structure=structure, prior_precision=2.0)
    wide = HeadPosterior.fit_features(head, (x, y), likelihood="classification",
                                      structure=structure, prior_precision=2.0,
                                      unseen_classes="prior")
    seen = frozen.ops.output_rows() < 4
    assert frozen.n_params == int(seen.sum()) and wide.n_params == seen.numel()
    assert frozen.summary()["unseen_classes"] == "freeze"
    torch.testing.assert_close(frozen.mean, wide.mean)
    var = frozen.posterior_variance
    assert torch.all(var[~seen] == 0) and torch.all(var[seen] > 0)
    if structure == "diag":
        torch.testing.assert_close(var[seen], wide.posterior_variance[seen], rtol=1e-5, atol=1e-9)
    else:  # the seen block of the precision is the same; compare precisions, not covariances
        cov = frozen.posterior_covariance[seen][:, seen]
        assert torch.all(frozen.posterior_covariance[~seen] == 0)
        if structure == "full":
            wide_precision = torch.linalg.inv(wide.posterior_covariance)[seen][:, seen]
            torch.testing.assert_close(torch.linalg.inv(cov), wide_precision, rtol=1e-4, atol=1e-5)
    draws = frozen.sample(50, seed=0).flat
    assert torch.all(draws[:, ~seen] == frozen.mean[~seen])
    assert torch.all(draws[:, seen].std(0) > 0)


def test_frozen_unseen_classes_survive_save_and_load(tmp_path):
    head = nn.Linear(4, 6)
    x, y = torch.randn(200, 4), torch.randint(1, 5, (200,))  # classes 0 and 5 never occur
    post = HeadPosterior.fit_features(head, (x, y), likelihood="classification")
    post.save(tmp_path)
    loaded = HeadPosterior.load(tmp_path, nn.ModuleDict({"head": head}))
    assert loaded.n_params == post.n_params < 6 * 5
    torch.testing.assert_close(loaded.posterior_variance, post.posterior_variance)
    torch.testing.assert_close(loaded.sample(3, seed=4).flat, post.sample(3, seed=4).flat)
    assert loaded.digest() == post.digest()
    assert loaded.log_marginal_likelihood() == pytest.approx(post.log_marginal_likelihood())
