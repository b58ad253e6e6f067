"""Checkpoints are complete or absent: only a manifest makes one, one committer wins, and
readers check it. Local folders and S3 (moto's server over real HTTP) alike."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from typer.testing import CliRunner

from orchestrator import checkpoints, storage
from orchestrator.cli import app
from orchestrator.errors import ForgeError


@pytest.fixture(params=["local", "s3"])
def job(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "job")
    return request.getfixturevalue("s3_bucket") + "/jobs/job"


def stage(job: str, step: int, meta: dict, tmp: Path, world: int = 2) -> str:
    """Write a checkpoint the way training does: each rank's folder indexed, then uploaded."""
    uri = storage.join(job, checkpoints.checkpoint_name(step))
    for rank in range(world):
        d = tmp / f"rank-{step}-{rank}"
        (d / "zero").mkdir(parents=True)
        (d / "zero" / f"zero_pp_rank_{rank}_model_states.pt").write_bytes(bytes([rank]) * 64)
        if rank == 0:
            (d / "model").mkdir()
            (d / "model" / "model.safetensors").write_bytes(b"x" * 100)
            (d / "meta.json").write_text(json.dumps({"step": step, **meta}))
        checkpoints.write_rank_index(d, rank)
        storage.upload_dir(d, uri)
    return uri


def make_ckpt(job, step, meta, tmp, commit=True, world=2):
    uri = stage(str(job), step, meta, tmp, world)
    if commit:
        checkpoints.commit(uri, step, world_size=world)
    return uri


def test_uncommitted_checkpoints_are_never_listed_or_chosen(tmp_path):
    assert checkpoints.latest_committed(str(tmp_path)) is None
    make_ckpt(tmp_path, 10, {"eval_loss": 2.0}, tmp_path)
    make_ckpt(tmp_path, 20, {"eval_loss": 0.1}, tmp_path, commit=False)  # crashed before its manifest
    ckpts = checkpoints.list_checkpoints(str(tmp_path))
    assert [c.step for c in ckpts] == [10]
    assert checkpoints.resolve(str(tmp_path), "best").step == 10
    assert checkpoints.resolve(str(tmp_path), "latest").step == 10
    assert checkpoints.latest_committed(str(tmp_path)).step == 10
    assert checkpoints.uncommitted(str(tmp_path)) == [str(tmp_path / "checkpoint-000020")]


def test_best_latest_index_and_name(tmp_path):
    for step, loss in [(10, 2.0), (20, 0.5), (30, 0.7)]:
        make_ckpt(tmp_path, step, {"eval_loss": loss, "test_accuracy": step / 100}, tmp_path)
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
    uri = make_ckpt(tmp_path, 10, {"eval_loss": 1.0}, tmp_path)
    c = checkpoints.resolve(uri)
    assert c.uri == uri and c.step == 10


def test_empty_job_folder_says_why(tmp_path):
    make_ckpt(tmp_path, 10, {}, tmp_path, commit=False)
    with pytest.raises(ForgeError, match=r"no committed checkpoints \(1 uncommitted\)"):
        checkpoints.resolve(str(tmp_path))
    with pytest.raises(ForgeError, match="no such job or checkpoint folder"):
        checkpoints.resolve(str(tmp_path / "missing"))


def test_manifest_lists_every_file_of_every_rank(job, tmp_path):
    uri = stage(job, 10, {}, tmp_path)
    manifest = checkpoints.commit(uri, 10, world_size=2, extra={"epoch": 1})
    assert manifest == storage.read_json(storage.join(uri, "manifest.json"))
    assert manifest["step"] == 10 and manifest["world_size"] == 2 and manifest["extra"] == {"epoch": 1}
    assert abs(manifest["created"] - time.time()) < 60
    ranks = {f["path"]: f["rank"] for f in manifest["files"]}
    assert ranks == {
        ".forge/files-rank-00000.json": 0, ".forge/files-rank-00001.json": 1,
        "meta.json": 0, "model/model.safetensors": 0,
        "zero/zero_pp_rank_0_model_states.pt": 0, "zero/zero_pp_rank_1_model_states.pt": 1,
    }
    sizes = dict(storage.walk_files(uri))
    assert all(f["size"] == sizes[f["path"]] and len(f["sha256"]) == 64 for f in manifest["files"])
    checkpoints.verify(uri, hashes=True, world_size=2)


def test_commit_needs_every_rank_index(job, tmp_path):
    uri = stage(job, 10, {}, tmp_path, world=2)
    with pytest.raises(ForgeError, match=r"1 of 3 ranks' file indexes .*files-rank-00002\.json"):
        checkpoints.commit(uri, 10, world_size=3)
    assert not checkpoints.is_committed(uri)


def test_commit_checks_the_listing_against_the_indexes(job, tmp_path):
    uri = stage(job, 10, {}, tmp_path)
    shard = storage.join(uri, "zero", "zero_pp_rank_1_model_states.pt")
    storage.write_bytes(shard, b"short")  # the upload was cut off
    with pytest.raises(ForgeError, match=r"zero_pp_rank_1_model_states\.pt \(5 bytes, expected 64\)"):
        checkpoints.commit(uri, 10, world_size=2)
    fs, path = storage.filesystem(shard)
    fs.delete_file(path)
    with pytest.raises(ForgeError, match=r"not in storage: .*zero_pp_rank_1_model_states\.pt"):
        checkpoints.commit(uri, 10, world_size=2)
    assert not checkpoints.is_committed(uri)
    assert checkpoints.uncommitted(job) == [uri]


def test_commit_trusts_the_ranks_hashes_and_verify_catches_corruption(job, tmp_path):
    uri = stage(job, 10, {}, tmp_path)
    weights = storage.join(uri, "model", "model.safetensors")
    storage.write_bytes(weights, b"y" * 100)  # same size, other bytes: no download at commit
    checkpoints.commit(uri, 10, world_size=2)
    checkpoints.verify(uri)
    with pytest.raises(ForgeError, match="model.safetensors: sha256 differs"):
        checkpoints.verify(uri, hashes=True)


def test_ranks_that_disagree_on_a_shared_file_cannot_commit(tmp_path):
    job = str(tmp_path / "job")
    uri = storage.join(job, checkpoints.checkpoint_name(5))
    for rank in range(2):
        d = tmp_path / f"r{rank}"
        (d / "zero").mkdir(parents=True)
        (d / "zero" / "latest").write_text(f"tag-{rank}")
        checkpoints.write_rank_index(d, rank)
        storage.upload_dir(d, uri)
    with pytest.raises(ForgeError, match=r"zero/latest: written by ranks 0 and 1 with different"):
        checkpoints.commit(uri, 5, world_size=2)


def test_second_commit_is_refused(job, tmp_path):
    uri = stage(job, 10, {}, tmp_path)
    first = checkpoints.commit(uri, 10, world_size=2)
    with pytest.raises(checkpoints.CommitConflict, match=r"checkpoint-000010/manifest\.json: already committed"):
        checkpoints.commit(uri, 10, world_size=2, extra={"zombie": True})
    assert storage.read_json(storage.join(uri, "manifest.json")) == first


def test_moto_returns_412_on_a_conditional_put_conflict(s3_bucket):
    """forge's commit relies on it: pinned moto 5.2.5 must behave as S3 does."""
    s3, bucket = boto3.client("s3"), s3_bucket[len("s3://"):]
    s3.put_object(Bucket=bucket, Key="m.json", Body=b"1", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=bucket, Key="m.json", Body=b"2", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert e.value.response["Error"]["Code"] == "PreconditionFailed"
    assert s3.get_object(Bucket=bucket, Key="m.json")["Body"].read() == b"1"


def test_verify_names_missing_truncated_and_corrupted_files(job, tmp_path):
    uri = make_ckpt(job, 10, {}, tmp_path)
    checkpoints.verify(uri, hashes=True)
    weights = storage.join(uri, "model", "model.safetensors")
    storage.write_bytes(weights, b"y" * 100)
    with pytest.raises(ForgeError, match="model.safetensors: sha256 differs"):
        checkpoints.verify(uri, hashes=True)
    storage.write_bytes(weights, b"y" * 50)
    with pytest.raises(ForgeError, match="model.safetensors: size 50 differs from the manifest's 100"):
        checkpoints.verify(uri)
    fs, path = storage.filesystem(weights)
    fs.delete_file(path)
    with pytest.raises(ForgeError, match="model.safetensors: listed in the manifest but missing"):
        checkpoints.verify(uri)


def test_verify_catches_a_rank_count_that_is_not_the_world_size(tmp_path):
    uri = make_ckpt(tmp_path, 10, {}, tmp_path)
    with pytest.raises(ForgeError, match="written by 2 ranks, expected 4"):
        checkpoints.verify(uri, world_size=4)
    manifest_path = Path(uri) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = [f for f in manifest["files"] if f["rank"] == 0]  # a rank's part dropped
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ForgeError, match=r"world size 2 but rank indexes for 1 rank\(s\); missing: .*files-rank-00001"):
        checkpoints.verify(uri)
    manifest["files"].append({"path": ".forge/files-rank-00001.json", "rank": 1, "size": 1, "sha256": ""})
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ForgeError, match=r"zero: ZeRO state of 1 rank\(s\) for world size 2; no files from rank\(s\) \[1\]"):
        checkpoints.verify(uri)


def test_garbage_is_listed_and_removed_but_a_fresh_attempt_is_spared(tmp_path):
    job = str(tmp_path / "job")
    make_ckpt(job, 10, {}, tmp_path)
    old = make_ckpt(job, 20, {}, tmp_path, commit=False)
    fresh = make_ckpt(job, 30, {}, tmp_path, commit=False)
    hour_ago = time.time() - 3600
    for p in Path(old).rglob("*"):
        os.utime(p, (hour_ago, hour_ago))
    attempts, uploads = checkpoints.find_garbage(job, keep_newer_than_s=600)
    assert [u for u, _ in attempts] == [old] and attempts[0][1] >= 3600 and uploads == []

    listed = CliRunner().invoke(app, ["checkpoints", job, "--gc", "--json", "--keep-newer-than", "600"])
    assert json.loads(listed.output) == {"uncommitted": [old], "multipart_uploads": [], "removed": False}
    wrong = CliRunner().invoke(app, ["checkpoints", job, "--yes"])
    assert wrong.exit_code == 1 and "--yes removes what --gc lists" in str(wrong.exception)
    dry = CliRunner().invoke(app, ["checkpoints", job, "--gc", "--keep-newer-than", "600"])
    assert dry.exit_code == 0, dry.output
    assert f"would remove uncommitted checkpoint {old}" in dry.output and "--yes" in dry.output
    assert Path(old).is_dir()

    done = CliRunner().invoke(app, ["checkpoints", job, "--gc", "--yes", "--keep-newer-than", "600"])
    assert done.exit_code == 0, done.output
    assert "removed 1 uncommitted checkpoint(s)" in done.output
    assert not Path(old).exists() and Path(fresh).is_dir()
    assert [c.step for c in checkpoints.list_checkpoints(job)] == [10]
    assert checkpoints.remove_uncommitted(job, keep_newer_than_s=0) == [fresh]
    assert checkpoints.uncommitted(job) == []


def test_ray_trains_uploads_through_forges_bounded_filesystem_commit(s3_bucket, tmp_path):
    """What ``ray.train.report`` does with ``storage.ray_storage``'s filesystem on each worker:
    the pickled context keeps forge's bounds, and every rank's upload commits."""
    import pickle

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    path, fs = storage.ray_storage(storage.join(s3_bucket, "jobs"))
    ctx = pickle.loads(pickle.dumps(StorageContext(path, "job", fs)))
    assert isinstance(ctx.storage_filesystem, storage.BoundedS3FileSystem)
    for rank in range(2):
        d = tmp_path / f"r{rank}"
        (d / "zero").mkdir(parents=True)
        (d / "zero" / f"zero_pp_rank_{rank}_model_states.pt").write_bytes(bytes([rank]) * 10)
        checkpoints.write_rank_index(d, rank)
        ctx.persist_current_checkpoint(Checkpoint.from_directory(str(d)), "checkpoint-000001")
    uri = storage.join(s3_bucket, "jobs", "job", "checkpoint-000001")
    checkpoints.commit(uri, 1, world_size=2)
    checkpoints.verify(uri, hashes=True, world_size=2)


def test_a_damaged_rank_index_is_named(tmp_path):
    uri = stage(str(tmp_path / "job"), 10, {}, tmp_path)
    index = storage.join(uri, ".forge", "files-rank-00001.json")
    storage.write_bytes(index, b'{"rank": 1, "files": [{"path": "zero/x"}]}')
    with pytest.raises(ForgeError, match=r"files-rank-00001\.json: not a rank index for rank 1"):
        checkpoints.commit(uri, 10, world_size=2)
