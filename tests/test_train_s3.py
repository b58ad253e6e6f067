"""The same job with every artefact on S3 (moto's server over real HTTP): data, base model,
checkpoints and the job record; then the checkpoint is loaded back from s3:// and served locally."""

from __future__ import annotations

import pytest

from conftest import EXAMPLES
from orchestrator import checkpoints, storage
from orchestrator.spec import load_spec

pytestmark = pytest.mark.integration


def test_train_to_s3_and_load_from_s3(ray_cluster, s3_bucket, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.train.trainer import run_training

    # the dataset itself is read from S3 too
    data_uri = storage.join(s3_bucket, "data", "train.jsonl")
    storage.write_bytes(data_uri, (EXAMPLES / "data" / "train.jsonl").read_bytes())
    spec = load_spec(
        EXAMPLES / "ticket-router.yaml",
        overrides=[f"storage={s3_bucket}/runs", f"dataset.train={data_uri}", "training.epochs=2",
                   "checkpoints.count=1", "name=s3-job"],
    )
    assert spec.job_uri == f"{s3_bucket}/runs/jobs/s3-job"
    record = run_training(spec)
    assert record["status"] == "succeeded"
    assert storage.read_json(storage.join(spec.job_uri, "job.json"))["status"] == "succeeded"
    (ckpt,) = checkpoints.list_checkpoints(spec.job_uri)
    checkpoints.verify(ckpt.uri, hashes=True)
    assert ckpt.uri.startswith("s3://") and ckpt.meta["eval_loss"] > 0
    local = storage.local_copy(ckpt.model_uri, cache_root=str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(local)
    ids = tok(spec.test_prompts[0].prompt, return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    # nothing was written to the local default storage
    assert not (EXAMPLES / "forge-runs").exists()
