"""Training recipe shared by the text reference models: a tiny masked-diffusion transformer on a
verifiable task (:mod:`genunc.tasks`).

Loss: MDLM's absorbing-state objective restricted to the answer positions (cross-entropy on the
masked answer tokens, mask rate t ~ U(0, 1]), AdamW with a one-cycle schedule.  The held-out
problems are never seen; the report gives greedy low-confidence accuracy on them.  Recipes stop
while the model is still wrong on a sizeable share of held-out problems, so that selecting among
candidates (and the unmasking order) matters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.research.training import default_device, train_steps, write_report
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.zoo.text_model import MaskedDiffusionTransformer, save_model


@dataclass
class MDLMRecipe:
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seed: int = 0


@torch.no_grad()
def answers(model: MaskedDiffusionTransformer, task: Any, problems: np.ndarray,
            config: UnmaskingConfig | None = None, chunk: int = 1000) -> np.ndarray:
    """Whether the model answers each problem correctly (default: greedy low-confidence)."""
    adapter = MaskedDiffusionLMAdapter(model.eval(), "head", task.mask_id)
    ok = [task.check(unmask(adapter, task.prompts(problems[i : i + chunk]),
                            config or UnmaskingConfig("low_confidence")).tokens)
          for i in range(0, len(problems), chunk)]
    return np.concatenate(ok)


def accuracy(model: MaskedDiffusionTransformer, task: Any, problems: np.ndarray,
             config: UnmaskingConfig | None = None) -> float:
    return float(answers(model, task, problems, config).mean())


def train_mdlm(task: Any, recipe: Any, out_dir: str | Path, *, command: str, desc: str,
               device: str | None = None, progress: bool = True,
               extra_report: Callable[[MaskedDiffusionTransformer, dict], dict] | None = None) -> dict:
    """Train `recipe` (an :class:`MDLMRecipe` or a dataclass with its fields) on the training
    split of `task`, save the model in `out_dir` and write ``training.json``."""
    device = default_device(device)
    torch.manual_seed(recipe.seed)
    split = task.split(seed=recipe.seed)
    train = task.sequences(split["train"]).to(device)
    model = MaskedDiffusionTransformer(task.vocab_size, task.length, recipe.d_model,
                                       recipe.n_layers, recipe.n_heads).to(device)
    adapter = MaskedDiffusionLMAdapter(model, "head", task.mask_id)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.steps,
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(recipe.seed)
    prompt_mask = task.prompt_mask(recipe.batch_size).to(device)

    def batch_loss(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(train), (recipe.batch_size,), generator=g).to(device)
        pairs = adapter.training_pairs({"x": train[ids], "prompt_mask": prompt_mask}, g)
        logits = model(pairs.inputs["x"]).logits
        return torch.nn.functional.cross_entropy(logits[pairs.mask], pairs.target[pairs.mask])

    result = train_steps(model, opt, batch_loss, steps=recipe.steps, lr_scheduler=sched,
                         desc=desc, log_every=50, progress=progress)
    model = model.cpu().eval()
    report = {"test_accuracy_greedy_low_confidence": accuracy(model, task, split["test"]),
              "train_accuracy_greedy_low_confidence_2000":
                  accuracy(model, task, split["train"][:2000]),
              **(extra_report(model, split) if extra_report else {}),
              "final_loss_50": float(np.mean(result.losses[-50:])), "seconds": result.seconds,
              "device": device, "recipe": asdict(recipe), "command": command}
    save_model(model, task, Path(out_dir), {"training": report})
    return write_report(out_dir, report)
