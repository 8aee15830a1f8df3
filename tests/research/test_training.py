"""The training skeleton every recipe runs on: a resumed run equals an uninterrupted one."""

import pytest
import torch
from torch import nn

from genunc.errors import GenuncError
from genunc.research.training import Resumable, train_steps


def _run(tmp_path, steps, recipe=None, checkpoint="ckpt.pt"):
    torch.manual_seed(0)
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.05, total_steps=6)
    g = torch.Generator().manual_seed(1)

    def batch_loss(step):
        x = torch.randn(8, 3, generator=g)
        return ((model(x) - x[:, :2].flip(1)) ** 2).mean()

    resume = Resumable(tmp_path / checkpoint, recipe or {"lr": 0.05, "steps": steps}, None, g,
                       every=2)
    result = train_steps(model, opt, batch_loss, steps=steps, lr_scheduler=sched, ema=ema,
                         ema_decay=lambda s: min(0.9, (1 + s) / (10 + s)), resume=resume,
                         progress=False)
    return result, model, ema


def test_resumed_training_reproduces_the_uninterrupted_run(tmp_path):
    straight, model, ema = _run(tmp_path / "a", 6)
    _run(tmp_path / "b", 3)  # stopped after 3 steps (checkpointed)
    resumed, model_b, ema_b = _run(tmp_path / "b", 6)
    assert resumed.steps_done == straight.steps_done == 6
    assert resumed.losses == straight.losses
    for a, b in [(model, model_b), (ema, ema_b)]:
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_a_checkpoint_of_another_recipe_is_refused(tmp_path):
    _run(tmp_path, 2, recipe={"lr": 0.05, "steps": 2})
    with pytest.raises(GenuncError, match="different recipe"):
        _run(tmp_path, 4, recipe={"lr": 0.1, "steps": 4})
