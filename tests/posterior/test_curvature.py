"""genunc's closed-form GGN backend agrees with laplace-torch's generic (Jacobian) backend."""

import pytest
import torch
from laplace.curvature import CurvlinopsGGN
from torch import nn

from genunc.posterior import HeadPosterior

CASES = [
    ("conv-groups", nn.Conv2d(4, 6, 3, padding=1, groups=2), (24, 4, 5, 5), "regression"),
    ("conv-strided-reflect", nn.Conv2d(3, 2, 3, stride=2, dilation=2, padding=2,
                                       padding_mode="reflect"), (24, 3, 7, 7), "regression"),
    ("conv-same", nn.Conv2d(3, 2, 3, padding="same"), (24, 3, 6, 6), "regression"),
    ("linear", nn.Linear(5, 4), (50, 5), "regression"),
    ("linear-cls", nn.Linear(5, 4), (50, 5), "classification"),
]


def _fit(head, x, likelihood, structure, backend=None, batch_size=7):
    with torch.no_grad():
        out = head(x)
    y = torch.randint(0, out.shape[-1], (x.shape[0],)) if likelihood == "classification" \
        else torch.randn_like(out).flatten(1)
    return HeadPosterior.fit_features(head, (x, y), likelihood=likelihood, structure=structure,
                                      prior_precision=1.0, sigma_noise=1.0, backend=backend,
                                      batch_size=batch_size)


@pytest.mark.parametrize("name,head,shape,likelihood", CASES, ids=[c[0] for c in CASES])
def test_closed_form_diag_equals_jacobian_ggn(name, head, shape, likelihood):
    x = torch.randn(shape)
    torch.manual_seed(0)
    fast = _fit(head, x, likelihood, "diag")
    torch.manual_seed(0)
    slow = _fit(head, x, likelihood, "diag", backend=CurvlinopsGGN)
    assert fast.info["backend"] == "LinearHeadGGN"
    torch.testing.assert_close(fast.laplace.H, slow.laplace.H, rtol=1e-4, atol=1e-4)
    assert float(fast.laplace.loss) == pytest.approx(float(slow.laplace.loss), rel=1e-5)


@pytest.mark.parametrize("head,shape", [
    (nn.Conv2d(3, 2, 3, padding=1, bias=False), (20, 3, 6, 6)),
    (nn.Linear(5, 4, bias=False), (40, 5)),
])
def test_closed_form_kron_is_exact_without_bias(head, shape):
    """Without a bias there are no cross terms: the Kronecker posterior is the full posterior."""
    x = torch.randn(shape)
    torch.manual_seed(0)
    kron = _fit(head, x, "regression", "kron")
    torch.manual_seed(0)
    full = _fit(head, x, "regression", "full", backend=CurvlinopsGGN)
    torch.testing.assert_close(kron.posterior_covariance, full.posterior_covariance,
                               rtol=1e-4, atol=1e-7)


def test_closed_form_kron_equals_curvlinops_kfac_for_linear():
    x = torch.randn(60, 5)
    head = nn.Linear(5, 3)
    torch.manual_seed(0)
    fast = _fit(head, x, "regression", "kron")
    torch.manual_seed(0)
    slow = _fit(head, x, "regression", "kron", backend=CurvlinopsGGN)
    torch.testing.assert_close(fast.posterior_covariance, slow.posterior_covariance,
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("unseen", ["freeze", "prior"])
def test_softcapped_classification_diag_equals_jacobian_ggn(tmp_path, unseen):
    """Final-logit softcapping (c tanh(z / c)) after a Linear head: the closed-form diagonal
    carries (1 - tanh^2)^2 and matches the Jacobian GGN through the cap; the loss is on the
    capped logits; the cap survives save/load."""
    torch.manual_seed(0)
    head = nn.Linear(5, 6, bias=False)
    with torch.no_grad():
        head.weight.mul_(8)  # logits of tens: the cap bends them
    x = torch.randn(40, 5)
    y = torch.randint(0, 4, (40,))  # classes 4, 5 named by no target
    fits = [HeadPosterior.fit_features(head, (x, y), likelihood="classification", prior_precision=1.0,
                                       output_softcap=3.0, backend=backend, unseen_classes=unseen)
            for backend in (None, CurvlinopsGGN)]
    fast, slow = fits
    torch.testing.assert_close(fast.laplace.H, slow.laplace.H, rtol=1e-4, atol=1e-6)
    capped = torch.tanh(head(x) / 3.0) * 3.0
    loss = nn.functional.cross_entropy(capped, y, reduction="sum")
    assert float(fast.laplace.loss) == pytest.approx(float(loss), rel=1e-5)
    raw = HeadPosterior.fit_features(head, (x, y), likelihood="classification", prior_precision=1.0,
                                     unseen_classes=unseen)
    assert not torch.allclose(raw.laplace.H, fast.laplace.H)
    assert fast.info["output_softcap"] == 3.0 and raw.info["output_softcap"] is None
    fast.save(tmp_path)
    holder = nn.Module()
    holder.head = head
    loaded = HeadPosterior.load(tmp_path, holder)
    assert loaded.laplace.model.softcap == 3.0 and loaded.digest() == fast.digest()
