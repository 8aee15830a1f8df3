"""The shipped digits judge: independent of the classifier the scores use, and accurate on real digits."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from genunc.cli import main
from genunc.errors import ShapeMismatchError
from genunc.research.judges import DigitsJudge, DigitsJudgeEvaluator, JudgeRecipe, train_judge
from genunc.zoo.digits import DigitsClassifier, split_digits
from genunc.zoo.shipped import CLASSIFIER_DIR, JUDGE_DIR


@pytest.fixture(scope="module")
def judge():
    return DigitsJudgeEvaluator()


@pytest.fixture(scope="module")
def test_split():
    return split_digits()["test"]


def test_the_judge_is_another_architecture_than_the_classifier():
    judge = DigitsJudge.from_pretrained(JUDGE_DIR)
    classifier = DigitsClassifier.from_pretrained(CLASSIFIER_DIR)
    assert not any(isinstance(m, nn.Conv2d) for m in judge.modules())
    assert any(isinstance(m, nn.Conv2d) for m in classifier.body)
    judge_shapes = {tuple(p.shape) for p in judge.body.parameters()}
    classifier_shapes = {tuple(p.shape) for p in classifier.body.parameters()}
    assert not judge_shapes & classifier_shapes  # no feature layer could be a copy of the other's
    assert json.loads((JUDGE_DIR / "training.json").read_text())["recipe"]["seed"] != \
        json.loads((CLASSIFIER_DIR / "training.json").read_text())["recipe"]["seed"]


def test_the_judge_reads_real_test_digits(judge, test_split):
    images, labels = test_split
    predicted = judge.predicted_class(images)
    accuracy = float((predicted == labels.numpy()).mean())
    assert accuracy >= 0.95
    recorded = json.loads((JUDGE_DIR / "training.json").read_text())["test_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)
    agrees = judge.agrees(images, labels)
    assert agrees.dtype == bool and agrees.shape == (len(labels),)
    assert agrees.mean() == pytest.approx(accuracy)
    probabilities = judge.probabilities(images)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-6)


def test_features_are_one_vector_per_image_at_any_size(judge, test_split):
    images, labels = test_split
    features = judge.features(images)
    assert features.shape == (len(images), 128) and features.dtype == np.float64
    assert np.isfinite(features).all()
    small = DigitsJudgeEvaluator(batch_size=7)  # batching changes nothing
    np.testing.assert_allclose(small.features(images[:20]), features[:20], rtol=1e-5, atol=1e-6)
    large = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    assert judge.features(large).shape == (len(images), 128)
    assert judge.agrees(large.numpy(), labels).mean() >= 0.9  # arrays work too; resized back to 16x16
    assert judge.features(images[:0]).shape == (0, 128)


def test_the_judge_refuses_what_it_cannot_read(judge, test_split):
    images, labels = test_split
    with pytest.raises(ShapeMismatchError, match="labels"):
        judge.agrees(images, labels[:-1])
    with pytest.raises(ShapeMismatchError, match="grey"):
        judge.features(images.repeat(1, 3, 1, 1))
    with pytest.raises(ShapeMismatchError, match="grey"):
        judge.features(images[:, 0])


def test_a_trained_judge_round_trips_and_records_its_command(tmp_path):
    report = train_judge(JudgeRecipe(epochs=1), tmp_path)
    assert report["command"] == "genunc zoo train digits-judge --epochs 1 --seed 1"
    assert json.loads((tmp_path / "training.json").read_text())["test_accuracy"] == report["test_accuracy"]
    model = DigitsJudge.from_pretrained(tmp_path)
    x = split_digits()["test"][0][:8]
    torch.testing.assert_close(model(x), DigitsJudgeEvaluator(tmp_path).model(x))
    assert not model.training


def test_the_cli_trains_the_judge_with_its_own_seed_and_spares_the_shipped_one(tmp_path, capsys):
    assert main(["zoo", "train", "digits-judge", "--epochs", "1", "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "training.json").read_text())["recipe"]["seed"] == 1
    assert main(["zoo", "train", "digits-judge", "--epochs", "1", "--seed", "0",
                 "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "training.json").read_text())["recipe"]["seed"] == 0
    before = (JUDGE_DIR / "model.safetensors").stat().st_mtime_ns
    assert main(["zoo", "train", "digits-judge", "--out", str(JUDGE_DIR)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (JUDGE_DIR / "model.safetensors").stat().st_mtime_ns == before
