"""Fit a Laplace posterior on a denoiser's head, draw M weight sets, and read off uncertainty.

    python examples/fit_head_posterior.py

Uses a tiny untrained point-cloud denoiser so it runs in seconds; swap in your own model, adapter
and data loader.
"""

import torch

from genunc import HeadPosterior, NoisePredictionAdapter
from genunc.posterior import capture_head
from genunc.zoo.toy import ToyPointCloudDenoiser

torch.manual_seed(0)
model = ToyPointCloudDenoiser(n_features=8).eval()
mask = torch.rand(32, 12) < 0.8  # padded point clouds: ~80% real nodes
batches = [{"x": torch.randn(32, 12, 8) * mask[..., None], "node_mask": mask,
            "cond": {"node_mask": mask}} for _ in range(4)]

adapter = NoisePredictionAdapter(model, head_name="head")
posterior = HeadPosterior.fit(adapter, batches, repeats=4, structure="diag")
print(posterior)

# one backbone pass, M = 16 heads in one batched matmul
x_t, t = batches[0]["x"], torch.full((32,), 300)
with torch.no_grad(), capture_head(adapter.head) as record:
    model(x_t, t, node_mask=mask)
eps = posterior.sample(16, seed=0).apply(record.features)  # (16, 32, 12, 8)
sampled = eps.var(0)[mask].sum(-1)                                     # per-node variance
exact = posterior.output_variance(record.features)[mask].sum(-1)      # closed form, same thing
print(f"per-node predictive variance: sampled {sampled.mean():.3e}, closed form {exact.mean():.3e}")
