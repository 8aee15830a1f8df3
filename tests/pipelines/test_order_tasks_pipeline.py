"""The sudoku and sorting tasks run through TextUncertaintyPipeline (tiny untrained model)."""

import pytest
import torch

from genunc.pipelines import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import SortTask, SudokuTask, task_from_spec
from genunc.zoo.text_model import save_model

TASKS = [SudokuTask(2, train_size=40, test_size=8), SortTask(8, train_size=40, test_size=8)]


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_task_runs_through_the_pipeline(tmp_path, tiny_text_model, task):
    save_model(tiny_text_model(task.vocab_size, task.length), task, tmp_path)
    pipe = TextUncertaintyPipeline.from_pretrained(tmp_path)
    assert task_from_spec(pipe.metadata["task"]) == task
    split = task.split()
    pipe.fit_posterior([{"x": task.sequences(split["train"]),
                         "prompt_mask": task.prompt_mask(len(split["train"]))}], progress=False)
    prompts = task.prompts(split["test"])
    for config in (UnmaskingConfig("low_confidence", block_length=4),
                   UnmaskingConfig("threshold", threshold=0.5, position_temperature=0.2)):
        out = pipe(prompts, config, num_draws=3, scores=("mutual_information", "low_confidence"),
                   seed=0, progress=False)
        assert (out.tokens != task.mask_id).all()
        assert torch.equal(out.tokens[:, : task.prompt_length], prompts[:, : task.prompt_length])
        assert out.scores["mutual_information"].shape == (len(prompts),)
        assert task.check(out.tokens).shape == (len(prompts),)
        assert len(task.decode(out.tokens[0])) == task.length
