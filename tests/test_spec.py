"""The job spec: every rule, and the message a user sees for it."""

from __future__ import annotations

import pytest

from orchestrator.errors import SpecError
from orchestrator.spec import load_spec, parse_spec, recommended_epochs, resolved_dict

BASE = """\
name: demo
dataset:
  train: data/train.jsonl
test_prompts:
  - prompt: "Hello\\nTeam:"
"""


def problems(text: str, overrides=None) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_spec(text, "job.yaml", overrides)
    return e.value.problems


def test_minimal_spec_gets_every_default():
    spec = parse_spec(BASE)
    assert spec.model.base == "neox-tiny"
    assert spec.training.zero_stage == 3
    assert spec.checkpoints.count == 5
    assert spec.resources.num_workers == 2
    assert spec.storage == "./forge-runs"
    p = spec.test_prompts[0]
    assert (p.temperature, p.top_p, p.top_k, p.length, p.stop_sequences) == (0.7, 0.9, 40, 64, [])


def test_temperature_zero_is_rejected_with_advice_and_line():
    (msg,) = problems(BASE + "    temperature: 0\n")
    assert msg.startswith("line 6: test_prompts.0.temperature:")
    assert "use temperature 0.01 or top_k 1" in msg


def test_length_over_500_is_rejected():
    (msg,) = problems(BASE + "    length: 501\n")
    assert "test_prompts.0.length" in msg and "over the limit of 500" in msg


@pytest.mark.parametrize("count,ok", [(0, False), (1, True), (15, True), (16, False)])
def test_checkpoint_count_is_1_to_15(count, ok):
    text = BASE + f"checkpoints:\n  count: {count}\n"
    if ok:
        assert parse_spec(text).checkpoints.count == count
    else:
        (msg,) = problems(text)
        assert "checkpoints.count" in msg and ("greater than or equal to 1" in msg or "less than or equal to 15" in msg)


def test_test_prompts_are_1_to_15():
    (msg,) = problems(BASE.split("test_prompts")[0] + "test_prompts: []\n")
    assert "test_prompts" in msg and "at least 1" in msg
    many = BASE.split("test_prompts")[0] + "test_prompts:\n" + '  - prompt: "x"\n' * 16
    (msg,) = problems(many)
    assert "at most 15" in msg


def test_unknown_and_missing_fields_are_named():
    probs = problems("name: demo\ntraining:\n  epocs: 3\ntest_prompts:\n  - prompt: x\n")
    joined = "\n".join(probs)
    assert "dataset: required field is missing" in joined
    assert "line 3: training.epocs: unknown field" in joined


def test_wrong_types_name_the_field_and_value():
    (msg,) = problems(BASE + "training:\n  micro_batch_size: lots\n")
    assert msg.startswith("line 7: training.micro_batch_size:")
    assert "'lots'" in msg


def test_invalid_job_name():
    (msg,) = problems(BASE.replace("name: demo", "name: my job/1"))
    assert "name" in msg and "invalid job name" in msg


def test_zero_stage_and_precision_choices():
    (msg,) = problems(BASE + "training:\n  zero_stage: 4\n")
    assert "training.zero_stage" in msg
    (msg,) = problems(BASE + "training:\n  precision: fp8\n")
    assert "training.precision" in msg and "'fp32'" in msg


def test_empty_stop_sequence_rejected():
    (msg,) = problems(BASE + '    stop_sequences: [""]\n')
    assert "stop sequences must not be empty" in msg


def test_yaml_syntax_error_names_line():
    (msg,) = problems("name: demo\ndataset: [unclosed\n")
    assert msg.startswith("line ") and "not valid YAML" in msg


def test_set_overrides_apply_before_validation():
    spec = parse_spec(BASE, overrides=["training.epochs=2", "resources.num_workers=1"])
    assert spec.training.epochs == 2 and spec.resources.num_workers == 1
    (msg,) = problems(BASE, overrides=["training.epochs=0"])
    assert "training.epochs" in msg


def test_best_metric_test_accuracy_needs_expected():
    (msg,) = problems(BASE + "checkpoints:\n  best_metric: test_accuracy\n")
    assert "expected" in msg


@pytest.mark.parametrize("size,epochs", [(10, 4), (2_000_000, 3), (50_000_000, 2), (300_000_000, 1), (10**9, 1)])
def test_recommended_epochs_table(size, epochs):
    assert recommended_epochs(size) == epochs


def test_paths_resolve_against_the_yaml_folder(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": " b<|endoftext|>"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(BASE)
    spec = load_spec(job)
    assert spec.dataset.train == str(tmp_path / "data" / "train.jsonl")
    assert spec.storage.startswith("/")  # absolute: Ray workers run in other folders
    assert resolved_dict(spec)["training"]["epochs"] == 4  # from the size table


def test_example_job_is_valid():
    from conftest import EXAMPLES

    spec = load_spec(EXAMPLES / "ticket-router.yaml")
    assert spec.name == "ticket-router"
    assert all(p.expected for p in spec.test_prompts)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(SpecError, match="the file is empty"):
        load_spec(tmp_path / "empty.yaml")
