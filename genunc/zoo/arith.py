"""Recipe for the text reference model (``genunc zoo train arith-mdlm``).

A tiny masked-diffusion transformer learns to fill in the answer of ``a * b =`` problems
(:class:`~genunc.tasks.ArithmeticTask`) from the training operand pairs; the held-out pairs are
never seen.  Loss: MDLM's absorbing-state objective restricted to the answer positions
(cross-entropy on the masked answer tokens, mask rate t ~ U(0, 1]).  The recipe deliberately
stops while the model is still wrong on a sizeable share of held-out problems, so that
selecting among candidates matters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.tasks import ArithmeticTask
from genunc.zoo.text_model import MaskedDiffusionTransformer
from genunc.zoo.training import default_device, train_steps, write_report

ARITH_DIR = Path(__file__).parent / "weights" / "arith_mdlm"


@dataclass
class ArithRecipe:
    op: str = "*"
    digits: int = 2
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    seed: int = 0


def save_model(model: MaskedDiffusionTransformer, task: ArithmeticTask, directory: Path,
               extra: dict | None = None) -> None:
    """The model with its mask id and task, so the folder alone says how to run and check it."""
    model.save_pretrained(directory, mask_id=task.mask_id,
                          task={"name": "arithmetic", "op": task.op, "digits": task.digits},
                          **(extra or {}))


@torch.no_grad()
def accuracy(model: MaskedDiffusionTransformer, task: ArithmeticTask, pairs: np.ndarray,
             config: UnmaskingConfig | None = None) -> float:
    adapter = MaskedDiffusionLMAdapter(model.eval(), "head", task.mask_id)
    out = unmask(adapter, task.prompts(pairs), config or UnmaskingConfig("low_confidence"))
    return float(task.check(out.tokens).mean())


def train_arith(recipe: ArithRecipe, out_dir: str | Path, device: str | None = None,
                progress: bool = True) -> dict:
    device = default_device(device)
    torch.manual_seed(recipe.seed)
    task = ArithmeticTask(recipe.op, recipe.digits)
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
                         desc="arith MDLM", log_every=50, progress=progress)
    model = model.cpu().eval()
    report = {"test_accuracy_greedy_low_confidence": accuracy(model, task, split["test"]),
              "train_accuracy_greedy_low_confidence_2000":
                  accuracy(model, task, split["train"][:2000]),
              "final_loss_50": float(np.mean(result.losses[-50:])), "seconds": result.seconds,
              "device": device, "recipe": asdict(recipe),
              "command": f"genunc zoo train arith-mdlm --steps {recipe.steps} "
                         f"--batch-size {recipe.batch_size} --seed {recipe.seed}"}
    save_model(model, task, Path(out_dir), {"training": report})
    return write_report(out_dir, report)
