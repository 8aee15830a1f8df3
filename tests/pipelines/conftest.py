"""Fixtures the pipeline tests share."""

import pytest

from genunc.pipelines.text import TextUncertaintyPipeline
from genunc.tasks import ArithmeticTask
from genunc.zoo.text_model import save_model

_TASK = ArithmeticTask("*", 2)


@pytest.fixture(scope="module")
def sampler(tmp_path_factory, tiny_text_model):
    """``(pipeline, folder)``: the text pipeline of a tiny untrained model of 2-digit
    multiplication (``ArithmeticTask("*", 2)``) saved in ``folder``, its head posterior fitted on 60
    training pairs and saved beside it (``folder / "genunc_posterior"``)."""
    model = tiny_text_model(_TASK.vocab_size, _TASK.length)
    directory = tmp_path_factory.mktemp("arith")
    save_model(model, _TASK, directory)
    sampler = TextUncertaintyPipeline.from_pretrained(directory)
    pairs = _TASK.split()["train"][:60]
    batches = [{"x": _TASK.sequences(pairs[i : i + 30]), "prompt_mask": _TASK.prompt_mask(30)}
               for i in (0, 30)]
    sampler.fit_posterior(batches, progress=False)
    sampler.posterior.save(directory / "genunc_posterior")
    return sampler, directory
