"""The text job on a diffusers text pipeline folder: a tiny LLaDA2Pipeline saved here (a
one-layer BERT as its bidirectional model, a word-level tokenizer) through ``genunc fit`` and
``genunc generate -c``, as the image job runs a diffusers image folder."""

import json

import pytest
import torch
import yaml

pytest.importorskip("diffusers")
from diffusers import BlockRefinementScheduler, LLaDA2Pipeline  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast  # noqa: E402

from genunc import streams  # noqa: E402
from genunc.cli import main  # noqa: E402
from genunc.config import load_config  # noqa: E402
from genunc.errors import ConfigError  # noqa: E402
from genunc.export import Export  # noqa: E402
from genunc.jobs import job_for  # noqa: E402
from genunc.pipelines.text import TextUncertaintyPipeline  # noqa: E402
from genunc.posterior import Posterior  # noqa: E402

WORDS = ["<pad>", "<eos>", "<mask>", "<unk>", *map(str, range(10)), "+", "=", "a", "b", "c", "d"]
PROMPTS = ["1 + 2 =", "3 + 4 =", "2 + 2 ="]
CALL = dict(gen_length=6, block_length=3, num_inference_steps=3)


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    """A saved LLaDA2Pipeline folder (diffusers 0.42 does not save a tokenizers-backed
    tokenizer itself: it is saved beside, as a real checkpoint ships it)."""
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>",
                                        eos_token="<eos>", mask_token="<mask>", unk_token="<unk>")
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=32,
                                       max_position_embeddings=64)).eval()
    folder = tmp_path_factory.mktemp("llada2")
    LLaDA2Pipeline(model=model, scheduler=BlockRefinementScheduler(), tokenizer=tokenizer
                   ).save_pretrained(folder)
    tokenizer.save_pretrained(folder / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "fit.jsonl").write_text("\n".join(
        json.dumps({"prompt": f"{a} + {b} =", "answer": f"{'abcd'[(a + b) % 4]} {'abcd'[a % 4]}"})
        for a in range(4) for b in range(4)))
    return folder


def _config(tmp_path, folder, **generate):
    config = {
        "modality": "text", "model": str(folder), "features": None, "quality": None,
        "posterior": {"dir": str(tmp_path / "posterior"), "data": str(folder / "fit.jsonl"),
                      "repeats": 2, "prior_precision": 1.0},
        "generate": {"n_samples": 6, "candidates": 2, "num_draws": 3, "steps": 3,
                     "block_length": 3, "gen_length": 6, "temperature": 1.0, "chunk_size": 1,
                     "prompts": PROMPTS, "scores": ["mutual_information", "random"],
                     "out": str(tmp_path / "export"), **generate},
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_llada2_folder_runs_through_fit_and_generate(tmp_path, llada_folder):
    config = _config(tmp_path, llada_folder)
    assert main(["fit", "-c", str(config)]) == 0
    assert main(["generate", "-c", str(config)]) == 0
    export = Export(tmp_path / "export")
    records = export.records
    assert [r["condition"] for r in records] == [p for p in PROMPTS for _ in range(2)]
    assert all(r["mutual_information"] > 0 for r in records)
    assert "nfe" not in records[0] and "correct" not in records[0]

    # each sample is the plain pipeline's answer to its prompt with its own generator, and its
    # score is the wrapper's on that call (the saved posterior)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(llada_folder,
                                             tokenizer=PreTrainedTokenizerFast.from_pretrained(
                                                 llada_folder / "tokenizer"))
    pipe.set_progress_bar_config(disable=True)
    upipe = TextUncertaintyPipeline.from_pipe(pipe)
    upipe.posterior = Posterior.load(tmp_path / "posterior", upipe.model)
    for i, record in enumerate(records):
        generator = streams.torch_generator(0, "initial_noise", i)
        out = upipe(prompt=[record["condition"]], generator=generator, num_draws=3, seed=0,
                    temperature=1.0, **CALL)
        assert record["completion"] == out.texts[0]
        assert record["mutual_information"] == pytest.approx(out.scores["mutual_information"][0])
        # each token the completion shows, with its MI at its last commit (what genunc report
        # colours): the pieces join to the completion; special tokens (those the decoded text
        # drops), EOS and what follows are left out
        pieces = json.loads(export.path(record).read_text())["sample"]["token_mutual_information"]
        assert "".join(piece for piece, _ in pieces) == record["completion"]
        ids, mi = out.sequences[0].tolist(), out.token_scores["mutual_information"][0]
        end = ids.index(pipe.eos_token_id) if pipe.eos_token_id in ids else len(ids)
        shown = [(k, WORDS[t]) for k, t in enumerate(ids[:end]) if not WORDS[t].startswith("<")]
        assert [piece for piece, _ in pieces] == [(" " if j else "") + word
                                                  for j, (_, word) in enumerate(shown)]
        assert [value for _, value in pieces] == pytest.approx([float(mi[k]) for k, _ in shown])

    from genunc.report import write_report

    page = write_report(tmp_path / "export", tmp_path / "report.html").read_text()
    assert "no per-token MI" not in page and page.count("data-mi=") >= 2 * 2


def test_a_llada2_folder_takes_a_tail_posterior(tmp_path, llada_folder):
    config = _config(tmp_path, llada_folder, n_samples=2)
    assert main(["generate", "-c", str(config), "--set", "posterior.tail=1"]) == 0
    records = Export(tmp_path / "export").records
    assert len(records) == 2 and all(r["mutual_information"] > 0 for r in records)
    saved = Posterior.load(tmp_path / "posterior", BertForMaskedLM.from_pretrained(llada_folder / "model"))
    assert saved.kind == "tail" and saved.tail.names[0] == "bert.encoder.layer.0"


def test_a_llada2_folder_refuses_what_it_cannot_do(tmp_path, llada_folder):
    job = job_for("text")
    for override, message in [("generate.chunk_size=2", "chunk_size: 1"),
                              ("generate.sampler=random", "own text loop"),
                              ("quality=checker", "no task"),
                              ("generate.prompts=null", "generate.prompts")]:
        config = load_config(_config(tmp_path, llada_folder), [override])
        with pytest.raises(ConfigError, match=message):
            job.build_pipeline(config, posterior="none")


def test_the_own_text_loop_takes_a_tail_posterior_through_the_cli(tmp_path):
    """The same job on a genunc text folder (the shipped arithmetic model): ``posterior.tail``
    now reaches the own loop, which re-runs the last block under the draws."""
    config = {"modality": "text", "model": "zoo:arith_mdlm", "features": "answer",
              "quality": "checker",
              "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:arith_train",
                            "max_samples": 64, "repeats": 1, "tail": 1},
              "generate": {"n_samples": 4, "candidates": 1, "num_draws": 3, "steps": None,
                           "temperature": 1.0, "chunk_size": 2, "sampler": "low_confidence",
                           "scores": ["mutual_information", "random"],
                           "out": str(tmp_path / "export")}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["generate", "-c", str(path)]) == 0
    export = Export(tmp_path / "export")
    assert export.metadata["posterior_summary"]["tail"][0] == "blocks.layers.3"
    mi = export.column("mutual_information")
    assert len(mi) == 4 and (mi > 0).all() and "correct" in export.records[0]


def _arith_config(tmp_path, **generate):
    config = {"modality": "text", "model": "zoo:arith_mdlm", "features": "answer",
              "quality": "checker",
              "posterior": {"dir": str(tmp_path / "posterior"), "data": "zoo:arith_train",
                            "max_samples": 64, "repeats": 1},
              "generate": {"n_samples": 4, "candidates": 1, "num_draws": 3, "steps": None,
                           "temperature": 1.0, "chunk_size": 2, "sampler": "low_confidence",
                           "scores": ["mutual_information", "random"],
                           "out": str(tmp_path / "export"), **generate}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("estimator", ["linearised", "pruned"])
def test_generate_mi_estimator_reaches_the_own_loop(tmp_path, estimator):
    """``generate.mi_estimator`` / ``mi_top_k``: the export's MI is what the pipeline computes
    with that estimator on the same chunks, and the completions are the sampled run's."""
    sampled = _arith_config(tmp_path / "sampled")
    assert main(["generate", "-c", str(sampled)]) == 0
    path = _arith_config(tmp_path / estimator, mi_estimator=estimator, mi_top_k=4)
    assert main(["generate", "-c", str(path)]) == 0
    export, reference = Export(tmp_path / estimator / "export"), Export(tmp_path / "sampled" / "export")
    assert [r["completion"] for r in export.records] == [r["completion"] for r in reference.records]
    assert export.metadata["config"]["generate"]["mi_estimator"] == estimator
    config = load_config(path)
    pipe = job_for("text").build_pipeline(config)
    expected = [float(v) for start in (0, 2) for v in
                pipe(**pipe.chunk_call(config["generate"], range(start, start + 2))
                     ).scores["mutual_information"]]
    assert export.column("mutual_information").tolist() == pytest.approx(expected, rel=1e-6)
    assert export.column("mutual_information").tolist() != \
        pytest.approx(reference.column("mutual_information").tolist(), rel=1e-3)


def test_generate_mi_estimator_reaches_a_wrapped_llada2(tmp_path, llada_folder):
    config = _config(tmp_path, llada_folder, n_samples=2)
    assert main(["fit", "-c", str(config)]) == 0
    assert main(["generate", "-c", str(config), "--set", "generate.mi_estimator=linearised",
                 "--set", f"generate.out={tmp_path / 'linearised'}"]) == 0
    assert main(["generate", "-c", str(config)]) == 0
    linearised, sampled = Export(tmp_path / "linearised"), Export(tmp_path / "export")
    assert [r["completion"] for r in linearised.records] == [r["completion"] for r in sampled.records]
    mi = linearised.column("mutual_information")
    assert (mi > 0).all() and mi.tolist() != pytest.approx(sampled.column("mutual_information").tolist())


@pytest.mark.parametrize("override", ["generate.mi_estimator=probit", "generate.mi_top_k=0"])
def test_a_bad_mi_estimator_is_a_config_error_naming_the_key(tmp_path, override, capsys):
    assert main(["generate", "-c", str(_arith_config(tmp_path)), "--set", override]) == 2
    assert f"  {override.split('=')[0]}: " in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
