"""W&B tracking (real wandb, offline, no network) and the loss-curve PNG (local and moto S3).

An offline run is checked by reading its ``.wandb`` transaction log: wandb 0.31 writes no summary
or config files offline, and has no Python reader of its own, so ``read_records`` decodes the log
(a header, then 32 KiB blocks of CRC-checked chunks, each a ``wandb_internal.Record`` protobuf).
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError
from orchestrator.spec import JobSpec
from orchestrator.train import tracking
from orchestrator.train.tracking import TABLE_KEY, Tracker, check_tracking, plot_loss_curve

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"prompt": "Ticket: my parcel is late\nTeam:", "expected": " Shipping"},
    {"prompt": "Ticket: the app crashes\nTeam:"},
]


# --- reading an offline run -------------------------------------------------------------------


def read_records(path: str | Path) -> list:
    """Every record of a ``.wandb`` file, checksums verified."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path}: not a W&B transaction log"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, last
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def items_to_dict(items) -> dict[str, Any]:
    """History/summary items (a key, or a path of nested keys, and a JSON value) as a dict."""
    out: dict[str, Any] = {}
    for i in items:
        *parents, last = list(i.nested_key) or [i.key]
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = json.loads(i.value_json)
    return out


def history(records: list) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for h in of_type(records, "history"):
        row = items_to_dict(h.item)
        rows.setdefault(int(row["_step"]), {}).update(row)
    return rows


def config(records: list) -> dict[str, Any]:
    (run,) = of_type(records, "run")
    return {i.key: json.loads(i.value_json) for i in run.config.update}


def summary(records: list) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in of_type(records, "summary"):
        out.update(items_to_dict(s.update))
    return out


def table_rows(run_dir: str, records: list) -> list[list[Any]]:
    """Rows of the last test-prompt table logged in the run."""
    tables = [h[TABLE_KEY] for h in history(records).values() if TABLE_KEY in h]
    assert tables, "no test-prompt table was logged"
    table = json.loads((Path(run_dir) / "files" / tables[-1]["path"]).read_text())
    assert table["columns"] == tracking.TABLE_COLUMNS
    return table["data"]


def run_dirs(wandb_dir: Path, run_id: str) -> list[str]:
    found = glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}"))
    found += glob.glob(str(wandb_dir / "wandb" / f"offline-run-*-{run_id}-*"))  # same second
    assert tracking.offline_run_folders(str(wandb_dir / "wandb"), run_id) == sorted(found)
    return sorted(found)


# --- a job as the loop sees it ------------------------------------------------------------------


def make_spec(tmp_path: Path, mode: str = "offline") -> JobSpec:
    return JobSpec.model_validate({
        "name": "track-me",
        "dataset": {"train": str(tmp_path / "train.jsonl")},
        "test_prompts": PROMPTS,
        "tracking": {"wandb": {"mode": mode, "dir": str(tmp_path / "wb"), "tags": ["ci"]}},
        "storage": str(tmp_path / "runs"),
    })


def start_job(spec: JobSpec) -> tuple[str, dict[str, Any]]:
    """The job record the driver writes before training, and the run config it hands the loop."""
    storage.write_json(storage.join(spec.job_uri, "job.json"), {"name": spec.name, "created": time.time()})
    plan = {"epochs": 2, "steps_per_epoch": 4, "total_steps": 8, "checkpoint_steps": [3, 6, 8]}
    return spec.job_uri, {**spec.model_dump(mode="json"), "plan": plan, "world_size": 2,
                          "wandb_dir": spec.tracking.wandb.dir}


def step_entry(step: int) -> dict[str, Any]:
    return {"step": step, "epoch": 1 + (step - 1) // 4, "loss": 3.0 / step, "lr": 1e-4,
            "tokens_per_s": 1000.0 + step, "tokens_seen": 512 * step, "grad_norm": 0.5, "time": time.time()}


def checkpoint_meta(step: int, completions: list[str]) -> dict[str, Any]:
    results = [{"prompt": p["prompt"], "completion": c, "expected": p.get("expected")}
               for p, c in zip(PROMPTS, completions, strict=True)]
    return {"step": step, "epoch": 1, "eval_loss": 2.0 / step, "eval_accuracy": None,
            "test_accuracy": 1.0 if completions[0].strip() == "Shipping" else 0.0,
            "tokens_seen": 512 * step, "train_loss": 3.0 / step, "test_prompts": results}


def commit_checkpoint(job_uri: str, meta: dict[str, Any], tmp_path: Path) -> None:
    """A committed checkpoint holding only its meta.json, through the real commit protocol."""
    local = tmp_path / f"ckpt-{meta['step']}"
    local.mkdir()
    (local / checkpoints.META).write_text(json.dumps(meta))
    checkpoints.write_rank_index(local, 0)
    uri = storage.join(job_uri, checkpoints.checkpoint_name(meta["step"]))
    storage.upload_dir(local, uri)
    checkpoints.commit(uri, meta["step"], 1)


# --- the tracker --------------------------------------------------------------------------------


def test_offline_run_holds_config_metrics_and_prompt_table(tmp_path):
    spec = make_spec(tmp_path)
    job_uri, run_config = start_job(spec)
    tracker = Tracker(spec, job_uri, run_config, rank=0)
    assert tracker.active
    for step in range(1, 7):
        entry = step_entry(step)
        if step == 5:
            entry["loss"] = float("nan")  # a diverging step is still tracked, tracking stays on
        tracker.log_step(entry)
        if step == 3:
            tracker.log_checkpoint(checkpoint_meta(3, [" Billing", " Technical"]))
        if step == 6:
            tracker.log_checkpoint(checkpoint_meta(6, [" Shipping", " Technical"]))
    assert tracker.active
    tracker.finish("succeeded")

    (run_dir,) = run_dirs(tmp_path / "wb", tracker.run_id)
    records = read_records(Path(run_dir) / f"run-{tracker.run_id}.wandb")
    rows = history(records)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[2]["train/loss"] == pytest.approx(1.5)
    assert math.isnan(rows[5]["train/loss"])
    assert rows[4]["train/tokens_seen"] == 2048 and rows[4]["train/grad_norm"] == 0.5
    assert "train/time" not in rows[4]  # wall-clock time is W&B's own _timestamp, not a metric
    assert rows[3]["eval/loss"] == pytest.approx(2 / 3) and rows[6]["eval/test_accuracy"] == 1.0
    assert "eval/accuracy" not in rows[3]  # None (not a classification job) is not logged
    assert "eval/loss" not in rows[4]
    cfg = config(records)
    assert cfg["name"] == "track-me" and cfg["plan"]["checkpoint_steps"] == [3, 6, 8]
    assert cfg["job_uri"] == job_uri and cfg["training"]["seed"] == 42
    assert table_rows(run_dir, records) == [
        ["checkpoint-000003", 3, PROMPTS[0]["prompt"], " Billing", " Shipping", False],
        ["checkpoint-000003", 3, PROMPTS[1]["prompt"], " Technical", None, None],
        ["checkpoint-000006", 6, PROMPTS[0]["prompt"], " Shipping", " Shipping", True],
        ["checkpoint-000006", 6, PROMPTS[1]["prompt"], " Technical", None, None],
    ]
    summ = summary(records)
    assert summ["checkpoint/best"] == "checkpoint-000006" and summ["forge/status"] == "succeeded"
    assert of_type(records, "exit")[-1].exit_code == 0
    # W&B's own reader of transaction logs (the wandb-core code `wandb sync` runs) agrees
    leet = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--summary",
                           "--json", run_dir], capture_output=True, text=True, timeout=120, check=True)
    state = json.loads(leet.stdout)
    assert (state["state"], state["exit_code"], state["step"], state["run_id"]) == ("finished", 0, 6, tracker.run_id)
    assert state["summary"]["eval/loss"] == {"min": pytest.approx(1 / 3)}
    assert state["summary"]["checkpoints/test_prompts"]["nrows"] == 4 and state["tags"] == ["ci"]
    # the offline run outlives the worker's node: copied into the job folder in storage
    copied = storage.join(job_uri, "wandb", os.path.basename(run_dir), f"run-{tracker.run_id}.wandb")
    assert storage.read_bytes(copied) == (Path(run_dir) / f"run-{tracker.run_id}.wandb").read_bytes()


def test_restarted_tracker_continues_the_run_without_repeating_steps(tmp_path):
    spec = make_spec(tmp_path)
    job_uri, run_config = start_job(spec)
    first = Tracker(spec, job_uri, run_config, rank=0)
    for step in range(1, 5):
        first.log_step(step_entry(step))
        if step == 3:
            meta = checkpoint_meta(3, [" Billing", " Technical"])
            first.log_checkpoint(meta)
            commit_checkpoint(job_uri, meta, tmp_path)
    first.finish("failed")  # the worker group dies after step 4; Ray Train restarts it from step 3
    storage.delete_dir(storage.join(job_uri, "wandb"))  # as if killed before copying its run folder

    second = Tracker(spec, job_uri, run_config, rank=0, resume_step=3)
    assert second.run_id == first.run_id
    for step in range(1, 9):  # steps up to 3 are offered again on purpose: they must be skipped
        second.log_step(step_entry(step))
        if step == 3:
            second.log_checkpoint(checkpoint_meta(3, [" Billing", " Technical"]))
        if step == 6:
            second.log_checkpoint(checkpoint_meta(6, [" Shipping", " Technical"]))
    second.finish("succeeded")

    dirs = run_dirs(tmp_path / "wb", first.run_id)
    assert len(dirs) == 2  # `wandb sync` replays both files of the run in order
    before, after = (read_records(Path(d) / f"run-{first.run_id}.wandb") for d in dirs)
    assert sorted(history(before)) == [1, 2, 3, 4]
    assert sorted(history(after)) == [4, 5, 6, 7, 8]
    assert {of_type(r, "run")[0].run_id for r in (before, after)} == {first.run_id}
    assert [of_type(r, "exit")[-1].exit_code for r in (before, after)] == [1, 0]
    rows = table_rows(dirs[1], after)
    assert [(r[0], r[3]) for r in rows] == [
        ("checkpoint-000003", " Billing"), ("checkpoint-000003", " Technical"),
        ("checkpoint-000006", " Shipping"), ("checkpoint-000006", " Technical"),
    ]
    assert storage.listdir(storage.join(job_uri, "wandb")) == [os.path.basename(d) for d in dirs]


def test_offline_run_folders_finds_every_attempt_of_one_run_only(tmp_path):
    names = ["offline-run-20261129_101010-job-ab12", "offline-run-20261129_101010-job-ab12-1",
             "offline-run-20261129_111111-job-ab12", "offline-run-20261129_101010-other-job-ab12",
             "offline-run-20261129_101010-job-ab123", "run-20261129_101010-job-ab12", "latest-run"]
    for n in names:
        (tmp_path / n).mkdir()
    assert [os.path.basename(f) for f in tracking.offline_run_folders(str(tmp_path), "job-ab12")] == names[:3]


def test_other_ranks_and_disabled_mode_do_nothing(tmp_path):
    spec = make_spec(tmp_path)
    job_uri, run_config = start_job(spec)
    for tracker in (Tracker(spec, job_uri, run_config, rank=1),
                    Tracker(make_spec(tmp_path, "disabled"), job_uri, run_config, rank=0)):
        assert not tracker.active
        tracker.log_step(step_entry(1))
        tracker.log_checkpoint(checkpoint_meta(1, [" Shipping", " Technical"]))
        tracker.finish("succeeded")
    assert not (tmp_path / "wb").exists()
    assert not storage.exists(storage.join(job_uri, "wandb"))


def test_worker_writes_where_the_driver_resolved_not_in_its_own_folder(tmp_path, monkeypatch):
    driver, session = tmp_path / "driver", tmp_path / "ray-session"
    driver.mkdir()
    session.mkdir()
    spec = make_spec(tmp_path)
    spec.tracking.wandb.dir = "wb-relative"
    monkeypatch.chdir(driver)
    job_uri, run_config = start_job(spec)
    run_config["wandb_dir"] = check_tracking(spec)
    monkeypatch.chdir(session)  # Ray workers run in Ray's session folder
    tracker = Tracker(spec, job_uri, run_config, rank=0)
    tracker.log_step(step_entry(1))
    tracker.finish("succeeded")
    assert len(run_dirs(driver / "wb-relative", tracker.run_id)) == 1
    assert list(session.iterdir()) == []


def test_no_secret_reaches_the_run_files(tmp_path, monkeypatch):
    wandb_key = "local-" + "k3y" * 14 + "WANDBSECRET"
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("FORGE_API_KEYS", "serve-token-ONE1,serve-token-TWO2")
    spec = make_spec(tmp_path)
    job_uri, run_config = start_job(spec)
    run_config["training"]["deepspeed"] = {"note": "key serve-token-TWO2 here", "api_key": "plain-xyz",
                                           "aws_secret_access_key": "abc123secret"}
    run_config["mirror"] = "https://alice:hunter2pass@example.com/models"
    tracker = Tracker(spec, job_uri, run_config, rank=0)
    tracker.log_step(step_entry(1))
    tracker.finish("succeeded")

    (run_dir,) = run_dirs(tmp_path / "wb", tracker.run_id)
    secrets = [wandb_key, "serve-token-ONE1", "serve-token-TWO2", "plain-xyz", "abc123secret",
               "hunter2pass", os.environ["AWS_SECRET_ACCESS_KEY"]]
    local = [p for p in Path(run_dir).rglob("*") if p.is_file() and not p.is_symlink()]
    copied = [storage.read_bytes(storage.join(job_uri, "wandb", os.path.basename(run_dir), rel))
              for rel, _ in storage.walk_files(storage.join(job_uri, "wandb", os.path.basename(run_dir)))]
    blobs = [p.read_bytes() for p in local] + copied
    assert len(copied) == len(local) > 0
    for secret in secrets:
        assert not any(secret.encode() in b for b in blobs), f"{secret!r} leaked into the run files"
    cfg = config(read_records(Path(run_dir) / f"run-{tracker.run_id}.wandb"))
    assert cfg["training"]["deepspeed"] == {"note": "key <redacted> here", "api_key": "<redacted>",
                                            "aws_secret_access_key": "<redacted>"}
    assert cfg["mirror"] == "https://alice:<redacted>@example.com/models"
    assert cfg["model"]["tokenizer_vocab_size"] == 1024  # a "token" in a name is not a secret


def test_run_id_is_stable_per_job_and_new_after_overwrite(tmp_path):
    spec = make_spec(tmp_path)
    job_uri, _ = start_job(spec)
    first = tracking.wandb_run_id(job_uri, spec.name)
    assert tracking.wandb_run_id(job_uri, spec.name) == first
    storage.write_json(storage.join(job_uri, "job.json"), {"name": spec.name, "created": time.time() + 5})
    assert tracking.wandb_run_id(job_uri, spec.name) != first
    long_id = tracking.wandb_run_id(str(tmp_path / "no-record-yet"), "n" * 100)
    assert len(long_id) <= 64 and not set("/\\#?%:") & set(long_id)


# --- W&B failing never fails training (separate processes: a broken wandb service stays broken) ---

FAULT_SCRIPT = """
import os, signal, sys, time, psutil
from orchestrator import storage
from orchestrator.spec import JobSpec
from orchestrator.train.tracking import Tracker
spec = JobSpec.model_validate({{"name": "f", "dataset": {{"train": "t.jsonl"}}, "test_prompts": [{{"prompt": "p"}}],
    "tracking": {{"wandb": {{"mode": "{mode}", "dir": sys.argv[1] + "/wb"}}}}, "storage": sys.argv[1] + "/runs"}})
t = Tracker(spec, spec.job_uri, {{}}, rank=0)
print("ACTIVE", t.active, flush=True)
t.log_step({{"step": 1, "loss": 1.0}})
if "{kill}" == "yes":
    for p in psutil.Process().children(recursive=True):
        if p.name().startswith("wandb"):
            os.kill(p.pid, signal.SIGKILL)
    time.sleep(0.5)
for step in (2, 3):
    t.log_step({{"step": step, "loss": 1.0 / step}})
t.log_checkpoint({{"step": 3, "eval_loss": 0.5, "test_prompts": [{{"prompt": "p", "completion": "c", "expected": None}}]}})
t.finish("succeeded")
print("TRAINING GOES ON", t.active, flush=True)
"""


def run_fault_script(tmp_path: Path, mode: str, kill: str, **env: str) -> subprocess.CompletedProcess:
    """The script in a fresh process with its own wandb service (WANDB_SERVICE would share ours)."""
    script = textwrap.dedent(FAULT_SCRIPT.format(mode=mode, kill=kill))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, **env}
    return subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_wandb_service_dying_mid_run_turns_tracking_off_once(tmp_path):
    proc = run_fault_script(tmp_path, "offline", "yes")
    assert proc.returncode == 0, proc.stderr
    assert "ACTIVE True" in proc.stdout and "TRAINING GOES ON False" in proc.stdout
    assert proc.stderr.count("[forge] warning: W&B log failed") == 1, proc.stderr


def test_online_without_a_key_warns_at_start_and_trains_on(tmp_path):
    proc = run_fault_script(tmp_path, "online", "no", HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"))
    assert proc.returncode == 0, proc.stderr
    assert "ACTIVE False" in proc.stdout and "TRAINING GOES ON False" in proc.stdout
    assert proc.stderr.count("[forge] warning: W&B start failed") == 1, proc.stderr


# --- the driver's check -------------------------------------------------------------------------


def test_check_tracking_resolves_the_folder_and_rejects_bad_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    spec = make_spec(tmp_path)
    assert check_tracking(make_spec(tmp_path, "disabled")) is None
    assert check_tracking(spec) == str(tmp_path / "wb") and (tmp_path / "wb").is_dir()
    spec.tracking.wandb.dir = None
    assert check_tracking(spec) == str(tmp_path)  # default: the folder forge runs in (./wandb)
    spec.tracking.wandb.dir = "s3://bucket/wandb"
    with pytest.raises(ForgeError, match=r"tracking\.wandb\.dir: W&B writes its run files to a local folder"):
        check_tracking(spec)
    spec.tracking.wandb.dir = str(tmp_path / "wb")
    spec.tracking.wandb.mode = "online"
    with pytest.raises(ForgeError, match="no W&B API key was found: set WANDB_API_KEY"):
        check_tracking(spec)
    monkeypatch.setenv("WANDB_API_KEY", "short-kEy")
    with pytest.raises(ForgeError, match="not a W&B API key") as err:
        check_tracking(spec)
    assert "short-kEy" not in str(err.value)
    monkeypatch.setenv("WANDB_API_KEY", "local-" + "a1" * 25)
    assert check_tracking(spec) == str(tmp_path / "wb")


# --- the loss curve -----------------------------------------------------------------------------

HISTORY = [{"step": s, "epoch": 1 + (s > 10), "loss": 4.0 / s} for s in range(1, 21)]
CKPTS = [{"name": checkpoints.checkpoint_name(s), "step": s, "eval_loss": 3.0 / s, "test_accuracy": s / 20}
         for s in (5, 10, 15, 20)]


def assert_png(data: bytes) -> None:
    from matplotlib import image

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(io.BytesIO(data), format="png")
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_loss_curve_shows_train_loss_eval_loss_and_accuracy():
    fig = tracking.loss_curve_figure(HISTORY, CKPTS, best="checkpoint-000020")
    ax, ax2 = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["train loss"].get_xdata()) == list(range(1, 21))
    assert list(lines["eval loss"].get_xdata()) == [5, 10, 15, 20]
    assert list(lines["best (checkpoint-000020)"].get_xdata()) == [20]
    assert [line.get_label() for line in ax2.get_lines()] == ["test accuracy"]
    assert list(ax2.get_lines()[0].get_ydata()) == [0.25, 0.5, 0.75, 1.0]
    no_accuracy = [{k: v for k, v in c.items() if k != "test_accuracy"} for c in CKPTS]
    assert len(tracking.loss_curve_figure(HISTORY, no_accuracy).axes) == 1


def test_plot_loss_curve_writes_a_png_locally_and_to_s3(tmp_path, s3_bucket):
    local = str(tmp_path / "jobs" / "j" / "loss.png")
    plot_loss_curve(HISTORY, CKPTS, local, best="checkpoint-000020")
    assert_png(Path(local).read_bytes())
    remote = storage.join(s3_bucket, "jobs", "j", "loss.png")
    plot_loss_curve(HISTORY, CKPTS, remote)
    assert_png(storage.read_bytes(remote))
    plot_loss_curve([], [], str(tmp_path / "empty.png"))  # a job that failed before its first step
    assert (tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
