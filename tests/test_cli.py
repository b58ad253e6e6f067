"""The forge command line: resolved specs, clear errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import EXAMPLES


def forge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from orchestrator.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_spec_show_prints_every_default():
    r = forge("spec", "show", str(EXAMPLES / "ticket-router.yaml"), "--set", "training.seed=7")
    assert r.returncode == 0, r.stderr
    spec = yaml.safe_load(r.stdout)
    assert spec["training"]["seed"] == 7
    assert spec["training"]["gradient_clipping"] == 1.0  # a default the YAML does not set
    assert spec["resources"]["max_failures"] == 3
    assert spec["dataset"]["train"].endswith("configs/examples/data/train.jsonl")


def test_invalid_spec_exits_2_with_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset:\n  train: t.jsonl\ntest_prompts:\n  - prompt: hi\n    temperature: 0\n")
    r = forge("spec", "show", str(bad))
    assert r.returncode == 2
    assert f"{bad}: 1 problem(s)" in r.stderr
    assert "line 6: test_prompts.0.temperature" in r.stderr
    assert "Traceback" not in r.stderr


def test_checkpoints_of_missing_job_is_a_clear_error(tmp_path):
    r = forge("checkpoints", str(tmp_path / "nope"))
    assert r.returncode == 1 and "no such job folder" in r.stderr
