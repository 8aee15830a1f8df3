"""Token mutual information without materialised draws (genunc.posterior.token_mi): the closed
forms against sampled MI, the pruned vocabulary against the full one, memory, and refusals."""

import sys

import pytest
import torch
from torch import nn

from genunc.errors import GenuncError, ShapeMismatchError
from genunc.posterior import HeadPosterior
from genunc.posterior.heads import head_ops_for
from genunc.posterior.token_mi import ClosedFormMI, LogitMap, PrunedMI, check_mi_estimator, token_mi
from genunc.scores.tokens import (
    bridge_mutual_information,
    jackknife_standard_error,
    mutual_information,
    mutual_information_leave_one_out,
)


def small_head(v=6, f=4, n=5, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(f, v)
    phi = torch.randn(n, f)
    with torch.no_grad():
        logits = head(phi)
    means = {k: p.detach().clone() for k, p in head.named_parameters()}
    return head, head_ops_for(head), phi, logits, means


def sampled_reference(means, stds, ops, phi, m, seed=0, logit_map=None):
    """M materialised draws (laplace-torch-like, one stream) and their MI with its jackknife SE."""
    g = torch.Generator().manual_seed(seed)
    params = {k: means[k] + stds[k] * torch.randn(m, *means[k].shape, generator=g) for k in means}
    logits = ops.apply(phi, params)
    if logit_map is not None:
        logits = logit_map(logits)
    return mutual_information(logits), jackknife_standard_error(mutual_information_leave_one_out(logits))


def test_linearised_equals_sampled_mi_within_its_monte_carlo_error():
    """Tolerance: 4 jackknife standard errors of the sampled MI (M = 4000) plus 3% of the value.
    The linearised MI is E KL expanded to second order in the logit noise; its relative error is
    of the order of the logit variance, here ~0.5% (weight variances 2e-4, features ~N(0, 1) in 4
    dimensions: logit variances ~1e-3), so the Monte-Carlo error dominates.  Also through a
    temperature (LogitMap scale, exact for a Gaussian)."""
    head, ops, phi, logits, means = small_head()
    variances = {k: torch.full_like(v, 2e-4) for k, v in means.items()}
    stds = {k: v.sqrt() for k, v in variances.items()}
    for logit_map in (LogitMap(), LogitMap(scale=1 / 0.7)):
        closed = ClosedFormMI(ops, variances, "linearised")(phi, logits, logit_map).mi
        sampled, se = sampled_reference(means, stds, ops, phi, 4000, logit_map=logit_map)
        assert (closed - sampled).abs().le(4 * se + 0.03 * closed).all(), (closed, sampled, se)
        assert (se < 0.05 * sampled).all()  # the check has teeth: the MC error is small


def test_bridge_equals_sampled_mi_where_the_bridge_is_exact():
    """The Laplace bridge inverts the Laplace approximation of a Dirichlet, so it is exact when
    the logits' Gaussian is one: logit variances 1 / alpha_k with alpha = alpha_0 * softmax(mean)
    and a large alpha_0 (= 2000: the Dirichlet is then close to a logistic normal, error
    O(1 / alpha_0) relative).  Built with bias variances only, one position.  Tolerance: 4
    jackknife standard errors (M = 4000) plus 5% of the value; equal variances, where the bridge
    is off by factors, are the scores page's caveat, not tested here."""
    head, ops, phi, logits, means = small_head(v=8, n=1)
    alpha = 2000 * torch.softmax(logits[0].double(), -1)
    variances = {"weight": torch.zeros_like(means["weight"]), "bias": (1 / alpha).float()}
    stds = {k: v.sqrt() for k, v in variances.items()}
    closed = ClosedFormMI(ops, variances, "bridge")(phi, logits).mi
    sampled, se = sampled_reference(means, stds, ops, phi, 4000, seed=1)
    assert (closed - sampled).abs().le(4 * se + 0.05 * closed).all(), (closed, sampled, se)
    # the bridge's centring: adding a constant to every logit (the softmax ignores it) changes
    # nothing, unlike laplace-torch's correction alone
    mean, var = logits.double(), ops.output_variance(phi, variances).double()
    torch.testing.assert_close(bridge_mutual_information(mean + 7.0, var),
                               bridge_mutual_information(mean, var))


def test_pruned_equals_full_mi_at_k_equal_v_with_the_same_random_numbers():
    """At K = V there is no remainder and the pruned estimate is sampled MI over the M full heads
    made from the same per-row numbers (materialise()): equal up to float32 rounding.  Below V
    the rows' own streams make the result independent of chunking."""
    head, ops, phi, logits, means = small_head(v=7, n=9)
    stds = {k: torch.full_like(v, 0.05) for k, v in means.items()}
    pruned = PrunedMI(ops, stds, 5, 7, seed=3, means=means)
    out = pruned(phi, logits, tokens=logits.argmax(-1))
    draws = pruned.materialise()
    full = draws.apply(phi)
    torch.testing.assert_close(out.mi, mutual_information(full), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.leave_one_out, mutual_information_leave_one_out(full),
                               rtol=1e-5, atol=1e-8)
    posterior_conf = torch.softmax(full.double(), -1).gather(
        -1, logits.argmax(-1).expand(5, -1).unsqueeze(-1)).squeeze(-1).mean(0)
    torch.testing.assert_close(out.token_probability, posterior_conf, rtol=1e-5, atol=1e-8)
    three = PrunedMI(ops, stds, 5, 3, seed=3, means=means)
    chunked = PrunedMI(ops, stds, 5, 3, seed=3, means=means, max_bytes=1)  # one position a chunk
    torch.testing.assert_close(three(phi, logits).mi, chunked(phi, logits).mi)
    assert (three(phi, logits).mi > 0).all()
    variances = {k: v.square() for k, v in stds.items()}
    for kind in ("linearised", "bridge"):  # closed forms: chunks of 2 and 1 positions, uneven
        whole = ClosedFormMI(ops, variances, kind)(phi, logits, tokens=logits.argmax(-1))
        parts = ClosedFormMI(ops, variances, kind, max_bytes=2 * 7 * 4 * 2)(
            phi, logits, tokens=logits.argmax(-1))
        torch.testing.assert_close(parts.mi, whole.mi)
        torch.testing.assert_close(parts.token_probability, whole.token_probability)


def test_linearised_over_the_top_rows_is_exact_at_k_equal_v_and_bounded_below():
    """``top_k``: the variance pass over the MAP's top-K rows only; the dropped rows' terms are
    at most 0.5 * (their MAP mass) * max variance."""
    head, ops, phi, logits, means = small_head(v=9, n=6)
    torch.manual_seed(2)
    variances = {k: torch.rand_like(v) * 1e-2 for k, v in means.items()}
    full = ClosedFormMI(ops, variances, "linearised")(phi, logits, tokens=logits.argmax(-1))
    at_v = ClosedFormMI(ops, variances, "linearised", top_k=9)(phi, logits, tokens=logits.argmax(-1))
    torch.testing.assert_close(at_v.mi, full.mi)
    torch.testing.assert_close(at_v.token_probability, full.token_probability)
    var = ops.output_variance(phi, variances).double()
    p = torch.softmax(logits.double(), -1)
    for k in (1, 4):
        top = ClosedFormMI(ops, variances, "linearised", top_k=k, max_bytes=1)(phi, logits).mi
        rest = 1 - p.topk(k, -1).values.sum(-1)
        assert (top <= full.mi + 1e-12).all()
        assert (full.mi - top <= 0.5 * rest * var.max(-1).values + 1e-12).all()
    with pytest.raises(GenuncError, match="mi_top_k applies to 'linearised' and 'pruned'"):
        ClosedFormMI(ops, variances, "bridge", top_k=4)


def test_collapsed_posterior_gives_zero_mi_for_every_estimator():
    head, ops, phi, logits, means = small_head()
    zeros = {k: torch.zeros_like(v) for k, v in means.items()}
    for kind in ("linearised", "bridge"):
        out = ClosedFormMI(ops, zeros, kind)(phi, logits, tokens=logits.argmax(-1))
        assert torch.equal(out.mi, torch.zeros(len(phi), dtype=torch.float64))
    for k in (2, 6):
        out = PrunedMI(ops, zeros, 4, k, means=means)(phi, logits)
        assert out.mi.abs().max() < 1e-12
    sampled, _ = sampled_reference(means, zeros, ops, phi, 4)
    assert sampled.abs().max() < 1e-12


def test_forbidden_classes_stay_forbidden():
    """A logit at the dtype's lowest (the mask token after post_head) has probability 0 under
    every estimator: the closed forms leave it out, the pruned draws keep it there."""
    head, ops, phi, logits, means = small_head()
    variances = {k: torch.full_like(v, 1e-3) for k, v in means.items()}
    masked = logits.clone()
    masked[:, 0] = torch.finfo(torch.float32).min
    for kind in ("linearised", "bridge"):
        out = ClosedFormMI(ops, variances, kind)(phi, masked, tokens=torch.zeros(5, dtype=torch.long))
        assert torch.isfinite(out.mi).all() and (out.mi > 0).all()
        assert (out.token_probability == 0).all()
    stds = {k: v.sqrt() for k, v in variances.items()}
    out = PrunedMI(ops, stds, 4, 6, means=means)(phi, masked)
    assert torch.isfinite(out.mi).all() and (out.mi > 0).all()


def _peak_extra_mb(fn):
    """Peak resident memory of the process during ``fn()`` above what it held before, in MB
    (Linux: the peak, VmHWM, is reset to the current size through /proc/self/clear_refs)."""
    def field(name):
        for line in open("/proc/self/status"):
            if line.startswith(name):
                return int(line.split()[1]) / 1024
        raise OSError(name)

    before = field("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    extra = field("VmHWM") - before
    del out
    return extra


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_draw_free_estimators_never_materialise_m_heads():
    """M = 32 draws of an 8,192 x 512 head (16 MB; M heads: 512 MB), 16 positions: the closed
    forms and the pruned estimator (chunked at 32 MB) stay under 200 MB of extra peak memory,
    while materialising the M heads, what sampled MI does, goes over it (the test has teeth)."""
    try:
        _peak_extra_mb(lambda: None)
    except OSError:
        pytest.skip("no writable /proc/self/clear_refs")
    v, f, m, n = 8192, 512, 32, 16
    head = nn.Linear(f, v, device="meta")
    ops = head_ops_for(head)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(v, f, generator=g) / f ** 0.5
    var = {"weight": torch.full((v, f), 1e-4), "bias": torch.full((v,), 1e-4)}
    std = {k: x.sqrt() for k, x in var.items()}
    phi = torch.randn(n, f, generator=g)
    logits = phi @ w.T
    cap = 200
    for kind in ("linearised", "bridge"):
        est = ClosedFormMI(ops, var, kind, max_bytes=2 ** 25)
        assert _peak_extra_mb(lambda est=est: est(phi, logits)) < cap
    pruned = PrunedMI(ops, std, m, 16, max_bytes=2 ** 25)
    assert _peak_extra_mb(lambda: pruned(phi, logits)) < cap
    materialised = _peak_extra_mb(lambda: mutual_information(
        torch.matmul(phi, (w + std["weight"] * torch.randn(m, v, f, generator=g)).transpose(1, 2))))
    assert materialised > cap


def test_bad_inputs_are_refused_in_one_line():
    head, ops, phi, logits, means = small_head()
    stds = {k: torch.full_like(v, 0.1) for k, v in means.items()}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(GenuncError, match="mi_top_k must be an integer >= 1"):
            PrunedMI(ops, stds, 4, bad)
    with pytest.raises(GenuncError, match="num_draws must be >= 2"):
        PrunedMI(ops, stds, 1, 3)
    with pytest.raises(GenuncError, match="mi_estimator must be one of"):
        check_mi_estimator("probit", 4)
    est = ClosedFormMI(ops, stds, "linearised")
    with pytest.raises(ShapeMismatchError, match="head features"):
        est(phi[:, :2], logits)
    with pytest.raises(ShapeMismatchError, match="MAP logits"):
        est(phi, logits[:2])
    with pytest.raises(ShapeMismatchError, match="MAP logits"):
        PrunedMI(ops, stds, 3, 2)(phi, logits[:, :3])
    # a posterior without independent logits is refused
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 6, (40,))
    kron = HeadPosterior.fit_features(head, (x, y), likelihood="classification", structure="kron")
    for kind in ("linearised", "bridge", "pruned"):
        with pytest.raises(GenuncError, match="needs the diagonal posterior") as err:
            token_mi(kron, kind, num_draws=4)
        assert "\n" not in str(err.value)
    with pytest.raises(GenuncError, match="no posterior"):
        token_mi(None, "bridge", num_draws=4)
    conv = HeadPosterior.fit_features(nn.Conv2d(2, 2, 1), (torch.randn(8, 2, 3, 3),
                                                           torch.randn(8, 18)))
    with pytest.raises(GenuncError, match="nn.Linear vocabulary head"):
        token_mi(conv, "pruned", num_draws=4)


def test_from_posterior_uses_the_posteriors_variances():
    head, ops, phi, logits, means = small_head()
    torch.manual_seed(1)
    x, y = torch.randn(60, 4), torch.randint(0, 6, (60,))
    post = HeadPosterior.fit_features(head, (x, y), likelihood="classification")
    closed = token_mi(post, "linearised", num_draws=2)(phi, logits).mi
    var = post.output_variance(phi).double()
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(closed, 0.5 * (var * p * (1 - p)).sum(-1))
    pruned = token_mi(post, "pruned", num_draws=3, top_k=6, seed=2)
    torch.testing.assert_close(pruned(phi, logits).mi,
                               mutual_information(pruned.materialise().apply(phi)),
                               rtol=1e-5, atol=1e-8)
