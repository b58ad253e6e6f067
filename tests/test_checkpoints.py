"""Checkpoints are complete or absent: only a manifest makes one, and readers check it."""

from __future__ import annotations

import pytest

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError


def make_ckpt(job, step, meta, commit=True):
    uri = storage.join(str(job), checkpoints.checkpoint_name(step))
    storage.write_json(storage.join(uri, "meta.json"), {"step": step, **meta})
    storage.write_bytes(storage.join(uri, "model", "model.safetensors"), b"x" * 100)
    if commit:
        checkpoints.commit(uri, step, world_size=2)
    return uri


def test_uncommitted_checkpoints_are_never_listed_or_chosen(tmp_path):
    make_ckpt(tmp_path, 10, {"eval_loss": 2.0})
    make_ckpt(tmp_path, 20, {"eval_loss": 0.1}, commit=False)  # crashed before its manifest
    ckpts = checkpoints.list_checkpoints(str(tmp_path))
    assert [c.step for c in ckpts] == [10]
    assert checkpoints.resolve(str(tmp_path), "best").step == 10
    assert checkpoints.resolve(str(tmp_path), "latest").step == 10


def test_best_latest_index_and_name(tmp_path):
    for step, loss in [(10, 2.0), (20, 0.5), (30, 0.7)]:
        make_ckpt(tmp_path, step, {"eval_loss": loss, "test_accuracy": step / 100})
    job = str(tmp_path)
    assert checkpoints.resolve(job, "best").step == 20
    assert checkpoints.resolve(job, "latest").step == 30
    assert checkpoints.resolve(job, "1").step == 10
    assert checkpoints.resolve(job, "checkpoint-000030").step == 30
    assert checkpoints.best_checkpoint(checkpoints.list_checkpoints(job), "test_accuracy").step == 30
    with pytest.raises(ForgeError, match="checkpoints 1 to 3"):
        checkpoints.resolve(job, "4")
    with pytest.raises(ForgeError, match="expected best, latest"):
        checkpoints.resolve(job, "newest")


def test_a_checkpoint_folder_resolves_to_itself(tmp_path):
    uri = make_ckpt(tmp_path, 10, {"eval_loss": 1.0})
    c = checkpoints.resolve(uri)
    assert c.uri == uri and c.step == 10


def test_empty_job_folder_says_why(tmp_path):
    make_ckpt(tmp_path, 10, {}, commit=False)
    with pytest.raises(ForgeError, match=r"no committed checkpoints \(1 uncommitted\)"):
        checkpoints.resolve(str(tmp_path))
    with pytest.raises(ForgeError, match="no such job or checkpoint folder"):
        checkpoints.resolve(str(tmp_path / "missing"))


def test_verify_names_missing_truncated_and_corrupted_files(tmp_path):
    uri = make_ckpt(tmp_path, 10, {})
    checkpoints.verify(uri, hashes=True)
    weights = storage.join(uri, "model", "model.safetensors")
    storage.write_bytes(weights, b"y" * 100)  # same size, other bytes
    with pytest.raises(ForgeError, match="model.safetensors: sha256 differs"):
        checkpoints.verify(uri, hashes=True)
    storage.write_bytes(weights, b"y" * 50)
    with pytest.raises(ForgeError, match="model.safetensors: size 50 differs from the manifest's 100"):
        checkpoints.verify(uri)
    (tmp_path / "checkpoint-000010" / "model" / "model.safetensors").unlink()
    with pytest.raises(ForgeError, match="model.safetensors: listed in the manifest but missing"):
        checkpoints.verify(uri)


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    uri = make_ckpt(tmp_path, 10, {})
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    assert manifest["step"] == 10 and manifest["world_size"] == 2
    assert {f["path"] for f in manifest["files"]} == {"meta.json", "model/model.safetensors"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"])
