"""Recipe for the text reference model (``genunc zoo train arith-mdlm``).

A tiny masked-diffusion transformer learns to fill in the answer of ``a * b =`` problems
(:class:`~genunc.tasks.ArithmeticTask`) from the training operand pairs; the held-out pairs are
never seen.  Loss: MDLM's absorbing-state objective restricted to the answer positions
(cross-entropy on the masked answer tokens, mask rate t ~ U(0, 1]).  The recipe deliberately
stops while the model is still wrong on a sizeable share of held-out problems, so that
selecting among candidates matters.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genunc.adapters.text import MaskedDiffusionLMAdapter
from genunc.sampling.masked import UnmaskingConfig, unmask
from genunc.tasks import ArithmeticTask
from genunc.zoo.text_model import MaskedDiffusionTransformer

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
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))
    config = {"model": model.config, "mask_id": task.mask_id,
              "task": {"name": "arithmetic", "op": task.op, "digits": task.digits}, **(extra or {})}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def accuracy(model: MaskedDiffusionTransformer, task: ArithmeticTask, pairs: np.ndarray,
             config: UnmaskingConfig | None = None) -> float:
    adapter = MaskedDiffusionLMAdapter(model.eval(), "head", task.mask_id)
    out = unmask(adapter, task.prompts(pairs), config or UnmaskingConfig("low_confidence"))
    return float(task.check(out.tokens).mean())


def train_arith(recipe: ArithRecipe, out_dir: str | Path = ARITH_DIR, device: str | None = None,
                progress: bool = True) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
    losses, start = [], time.time()
    bar = tqdm(range(recipe.steps), desc="arith MDLM", disable=not progress)
    for step in bar:
        ids = torch.randint(0, len(train), (recipe.batch_size,), generator=g).to(device)
        pairs = adapter.training_pairs({"x": train[ids], "prompt_mask": prompt_mask}, g)
        logits = model(pairs.inputs["x"]).logits
        loss = torch.nn.functional.cross_entropy(logits[pairs.mask], pairs.target[pairs.mask])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    model = model.cpu().eval()
    test_acc = accuracy(model, task, split["test"])
    train_acc = accuracy(model, task, split["train"][:2000])
    report = {"test_accuracy_greedy_low_confidence": test_acc,
              "train_accuracy_greedy_low_confidence_2000": train_acc,
              "final_loss_50": float(np.mean(losses[-50:])), "seconds": time.time() - start,
              "device": device, "recipe": asdict(recipe),
              "command": f"genunc zoo train arith-mdlm --steps {recipe.steps} "
                         f"--batch-size {recipe.batch_size} --seed {recipe.seed}"}
    out_dir = Path(out_dir)
    save_model(model, task, out_dir, {"training": report})
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
