"""Experiment tracking: Weights & Biases runs and the loss-curve PNG saved with each job.

The training loop creates one ``Tracker`` per worker; only rank 0 talks to W&B, every other rank
gets a no-op. W&B never breaks training: a failure while starting or logging prints one warning
and tracking turns itself off. A wrong configuration (online without an API key) is caught on the
driver before training by ``check_tracking``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import sys
from typing import Any

from orchestrator import checkpoints, storage
from orchestrator.errors import ForgeError
from orchestrator.spec import JobSpec

EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 130}
TABLE_KEY = "checkpoints/test_prompts"
TABLE_COLUMNS = ["checkpoint", "step", "prompt", "completion", "expected", "match"]
REDACTED = "<redacted>"
NOT_METRICS = {"step", "time"}  # the step is W&B's x-axis; W&B stamps its own wall-clock time
# Environment variables whose values never reach W&B, whatever field they were copied into.
SECRET_ENV = ("WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN",
              "FORGE_API_KEYS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "RAY_AUTH_TOKEN")
# Key names that hold secrets ("aws_secret_access_key", "api-key", "auth_token"; not "tokenizer").
_SECRET_NAME = re.compile(
    r"(?:^|[_.-])(?:api[_-]?key|apikey|secret|passw(?:or)?d|token|credentials?|access[_-]?key)(?:$|[_.-])",
    re.I,
)
_URL_PASSWORD = re.compile(r"(\w+://[^/:@\s]+):[^/@\s]+@")


# --- driver side ----------------------------------------------------------------------------


def check_tracking(spec: JobSpec) -> str | None:
    """Check the W&B settings on the driver before training; raise ForgeError when they are wrong.

    Returns the absolute folder W&B writes its run files to (None when tracking is disabled): pass
    it to the workers as ``run_config["wandb_dir"]``, since they run in Ray's session folder.
    """
    wb = spec.tracking.wandb
    if wb.mode == "disabled":
        return None
    if "://" in (wb.dir or ""):
        raise ForgeError(
            f"tracking.wandb.dir: W&B writes its run files to a local folder, got {wb.dir!r}; "
            "forge copies offline runs into the job folder in storage by itself"
        )
    folder = os.path.abspath(os.path.expanduser(wb.dir or os.getcwd()))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ForgeError(f"tracking.wandb.dir: cannot create {folder}: {e.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise ForgeError(f"tracking.wandb.dir: {folder} is not writable")
    if wb.mode == "online":
        _check_api_key()
    return folder


def _check_api_key() -> None:
    """An API key W&B will find (environment or ``wandb login``'s netrc), in a valid format."""
    from wandb.sdk.lib.wbauth import validation, wbnetrc

    key = os.environ.get("WANDB_API_KEY")
    if key:
        problem = validation.check_api_key(key)
        if problem:
            raise ForgeError(f"tracking.wandb.mode is online but WANDB_API_KEY is not a W&B API key: {problem}")
        return
    if os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = os.environ.get("WANDB_BASE_URL") or _default_base_url()
    try:
        found = wbnetrc.read_netrc_auth(host=host)
    except Exception as e:  # a malformed entry: wandb.init would fail the same way
        raise ForgeError(f"tracking.wandb.mode is online but the W&B login in ~/.netrc is unusable: {e}") from None
    if not found:
        raise ForgeError(
            "tracking.wandb.mode is online but no W&B API key was found: set WANDB_API_KEY (on every "
            "node of a remote cluster) or run `wandb login`; or use mode offline and `wandb sync` later"
        )


def _default_base_url() -> str:
    from wandb.sdk.lib import urls

    return urls.DEFAULT_BASE_URL


def wandb_run_id(job_uri: str, name: str) -> str:
    """The job's W&B run id: the same across worker restarts and ``forge train --resume`` (the
    job record keeps its creation time), new when ``--overwrite`` recreates the job."""
    created = None
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no record yet: the URI alone
        created = storage.read_json(storage.join(job_uri, "job.json")).get("created")
    digest = hashlib.sha256(f"{job_uri}\n{created}".encode()).hexdigest()[:10]
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:40]
    return f"{slug}-{digest}"


def scrub_secrets(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of ``obj`` with secret-named keys, secret values and URL passwords redacted."""
    if secrets is None:
        secrets = _secret_values()
    if isinstance(obj, dict):
        return {k: REDACTED if _SECRET_NAME.search(str(k)) and v not in (None, "")
                else scrub_secrets(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_secrets(v, secrets) for v in obj]
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", obj)
    return obj


def _secret_values() -> list[str]:
    values = []
    for name in SECRET_ENV:
        values += [v.strip() for v in os.environ.get(name, "").split(",")]
    return sorted({v for v in values if len(v) >= 6}, key=len, reverse=True)


# --- worker side ----------------------------------------------------------------------------


class Tracker:
    """One job's W&B run, driven by the training loop; a no-op off rank 0 or when disabled.

    Restarts continue the same run (``resume="allow"``); steps up to ``resume_step`` were logged by
    the attempt before and are skipped, and the test-prompt table is rebuilt from the committed
    checkpoints so its rows still cover the whole job.
    """

    def __init__(self, spec: JobSpec, job_uri: str, run_config: dict[str, Any], rank: int,
                 resume_step: int = 0) -> None:
        self.spec, self.job_uri, self.resume_step = spec, job_uri, resume_step
        self.run_id: str | None = None
        self.sync_dir: str | None = None  # this attempt's run folder (offline: what `wandb sync` takes)
        self._run = None
        self._last_step = resume_step
        self._rows: list[list[Any]] = []
        self._ckpts: list[checkpoints.CheckpointInfo] = []
        if rank == 0 and spec.tracking.wandb.mode != "disabled":
            self._guarded("start", self._start, run_config)

    @property
    def active(self) -> bool:
        return self._run is not None

    def _start(self, run_config: dict[str, Any]) -> None:
        import wandb

        wb = self.spec.tracking.wandb
        folder = _run_folder(wb.dir, run_config.get("wandb_dir"))
        os.makedirs(folder, exist_ok=True)
        self.run_id = wandb_run_id(self.job_uri, self.spec.name)
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                                  init_timeout=120, finish_timeout=300)
        self._run = wandb.init(
            mode=wb.mode, project=wb.project, entity=wb.entity, group=wb.group, tags=list(wb.tags),
            dir=folder, id=self.run_id, name=self.spec.name, job_type="train", resume="allow",
            reinit="create_new", allow_val_change=True, settings=settings,
            config=scrub_secrets({**run_config, "job_uri": self.job_uri}),
        )
        self.sync_dir = self._run.settings.sync_dir
        if self._run.resumed and self._run.starting_step:  # online: the server knows the last step
            self._last_step = max(self._last_step, self._run.starting_step - 1)
        for key, summary in (("eval/loss", "min"), ("eval/accuracy", "max"), ("eval/test_accuracy", "max")):
            self._run.define_metric(key, summary=summary)
        if self.resume_step > 0:
            self._rebuild_rows()
        where = self._run.url if wb.mode == "online" else f"{self.sync_dir} (upload: wandb sync {self.sync_dir})"
        _say(f"[forge] W&B run {self.run_id} ({wb.mode}): {where}")

    def _rebuild_rows(self) -> None:
        """The committed checkpoints' rows, logged by the attempts before this one."""
        try:
            for c in checkpoints.list_checkpoints(self.job_uri):
                if c.step <= self.resume_step:
                    self._add_checkpoint(c)
        except Exception as e:  # storage hiccup: the table then starts at this attempt
            _say(f"[forge] warning: could not read the earlier checkpoints' test prompts: {e}")

    def log_step(self, entry: dict[str, Any]) -> None:
        """Per-step metrics (step, epoch, loss, lr, tokens_per_s, tokens_seen, any other numbers)."""
        if self._run is not None:
            self._guarded("log", self._log_step, entry)

    def _log_step(self, entry: dict[str, Any]) -> None:
        step = int(entry["step"])
        if step <= self._last_step:
            return
        self._run.log({f"train/{k}": v for k, v in entry.items() if k not in NOT_METRICS and _is_number(v)},
                      step=step)
        self._last_step = step

    def log_checkpoint(self, meta: dict[str, Any]) -> None:
        """Eval metrics at the checkpoint's step and the test-prompt table with this checkpoint's rows."""
        if self._run is not None:
            self._guarded("log", self._log_checkpoint, meta)

    def _log_checkpoint(self, meta: dict[str, Any]) -> None:
        import wandb

        step = int(meta["step"])
        if step <= self.resume_step or any(c.step == step for c in self._ckpts):
            return
        self._add_checkpoint(checkpoints.CheckpointInfo(uri="", name=checkpoints.checkpoint_name(step),
                                                        step=step, meta=meta))
        if step < self._last_step:  # W&B already holds later steps (an earlier attempt logged them)
            return
        data: dict[str, Any] = {f"eval/{name}": meta.get(key) for key, name in
                                (("eval_loss", "loss"), ("eval_accuracy", "accuracy"),
                                 ("test_accuracy", "test_accuracy"))}
        data = {k: v for k, v in data.items() if _is_number(v)}
        data[TABLE_KEY] = wandb.Table(columns=TABLE_COLUMNS, data=[list(r) for r in self._rows])
        self._run.log(data, step=step)
        self._last_step = step
        best = checkpoints.best_checkpoint(self._ckpts, self.spec.checkpoints.best_metric)
        self._run.summary.update({"checkpoint/latest": self._ckpts[-1].name, "checkpoint/best": best.name})

    def _add_checkpoint(self, c: checkpoints.CheckpointInfo) -> None:
        from orchestrator.train.evaluation import exact_match

        self._ckpts.append(c)
        for r in c.meta.get("test_prompts") or []:
            expected = r.get("expected")
            match = None if expected is None else exact_match(r.get("completion", ""), expected)
            self._rows.append([c.name, c.step, r.get("prompt"), r.get("completion"), expected, match])

    def finish(self, status: str) -> None:
        """End the run with an exit code for ``status`` (succeeded | failed | cancelled) and shut down
        this process's W&B service; offline runs are then copied to ``<job>/wandb/`` so they
        outlive the worker's node."""
        if self._run is not None:
            run = self._run
            self._guarded("finish", self._finish, run, status)
            self._run = None
        if self.sync_dir and self.spec.tracking.wandb.mode == "offline":
            # this attempt's folder and those of attempts killed on this node before they could copy theirs
            folders = offline_run_folders(os.path.dirname(self.sync_dir), self.run_id or "")
            try:
                for folder in sorted(set(folders) | {self.sync_dir}):
                    upload_run_folder(folder, storage.join(self.job_uri, "wandb"))
            except Exception as e:
                _say(f"[forge] warning: could not copy the W&B run folder to the job: {type(e).__name__}: {e}")

    def _finish(self, run, status: str) -> None:
        import wandb

        run.summary["forge/status"] = status
        run.finish(exit_code=EXIT_CODES.get(status, 1))
        # finish() returns before W&B's service has flushed the run's files; tearing the service
        # down waits for that (and drops WANDB_SERVICE, which Ray workers started later would inherit).
        try:
            wandb.teardown()
        except SystemExit as e:  # wandb exits the process when its service failed; we must not
            raise RuntimeError(f"the W&B service exited with code {e.code}") from None

    def _guarded(self, what: str, fn, *args, **kwargs) -> None:
        """Run a W&B call; on any error print one warning and turn tracking off."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            if self._run is not None or what == "start":
                _say(f"[forge] warning: W&B {what} failed ({type(e).__name__}: {e}); tracking is off "
                     "for the rest of this run, training continues")
            self._run = None


def offline_run_folders(wandb_dir: str, run_id: str) -> list[str]:
    """The offline run folders of ``run_id`` under ``wandb_dir``, oldest first (one per attempt:
    ``offline-run-<time>-<id>``, with ``-<n>`` added when two start in the same second)."""
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    names = os.listdir(wandb_dir) if os.path.isdir(wandb_dir) else []
    return [os.path.join(wandb_dir, n) for n in sorted(names) if pattern.fullmatch(n)]


def upload_run_folder(run_dir: str, dest_uri: str) -> str:
    """Copy a W&B run folder's regular files (not its symlinked debug logs) to ``dest_uri/<name>``."""
    run_dir = os.path.abspath(run_dir)
    target = storage.join(dest_uri, os.path.basename(run_dir))
    for root, _dirs, files in os.walk(run_dir):
        for f in files:
            path = os.path.join(root, f)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(target, os.path.relpath(path, run_dir)), fh.read())
    return target


def _run_folder(configured: str | None, from_driver: str | None) -> str:
    """Where W&B writes on this worker: the spec's folder when absolute, else the one the driver
    resolved (``check_tracking``), else ``$FORGE_CACHE/wandb`` (never Ray's session folder)."""
    if configured and os.path.isabs(os.path.expanduser(configured)):
        return os.path.expanduser(configured)
    if from_driver:
        return from_driver
    return os.path.join(os.path.expanduser(os.environ.get("FORGE_CACHE", "~/.cache/forge")), "wandb")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _say(msg: str) -> None:
    """One line on the worker's stderr (past Ray Train's print patch, which would echo it twice)."""
    try:
        os.write(sys.__stderr__.fileno(), (msg + "\n").encode())
    except (AttributeError, OSError, ValueError):
        print(msg, file=sys.stderr)


# --- the loss curve -------------------------------------------------------------------------


def loss_curve_figure(history: list[dict[str, Any]], ckpts: list[dict[str, Any]],
                      best: str | None = None, title: str | None = None):
    """Train loss per step, the checkpoints' eval loss and, on a second axis, their accuracy."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5), dpi=110)
    ax = fig.add_subplot()
    steps = [int(e["step"]) for e in history]
    ax.plot(steps, [_finite(e.get("loss")) for e in history], color="tab:blue", lw=1.2, label="train loss")
    for prev, cur in zip(history, history[1:], strict=False):
        if cur.get("epoch") != prev.get("epoch"):
            ax.axvline(prev["step"], color="0.85", lw=0.8, ls=":")
    evals = [c for c in ckpts if _is_number(c.get("eval_loss"))]
    if evals:
        ax.plot([c["step"] for c in evals], [_finite(c["eval_loss"]) for c in evals], color="tab:orange",
                marker="o", lw=1.2, label="eval loss")
    for c in evals:
        if best is not None and c.get("name") == best:
            ax.plot([c["step"]], [_finite(c["eval_loss"])], marker="*", ms=16, color="tab:red",
                    ls="none", label=f"best ({best})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracies = [(key, color) for key, color in (("eval_accuracy", "tab:green"), ("test_accuracy", "tab:purple"))
                  if any(_is_number(c.get(key)) for c in ckpts)]
    if accuracies:
        ax2 = ax.twinx()
        for key, color in accuracies:
            pts = [c for c in ckpts if _is_number(c.get(key))]
            ax2.plot([c["step"] for c in pts], [c[key] for c in pts], color=color, marker="s", lw=1,
                     ls="--", label=key.replace("_", " "))
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("accuracy")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if not history and not evals:
        ax.text(0.5, 0.5, "no training steps recorded", ha="center", va="center", transform=ax.transAxes)
    if handles:
        ax.legend(handles, labels, loc="best")
    ax.set_title(title or "loss")
    fig.tight_layout()
    return fig


def plot_loss_curve(history: list[dict[str, Any]], checkpoints: list[dict[str, Any]], out_uri: str,
                    *, best: str | None = None, title: str | None = None) -> None:
    """Write the loss-curve PNG to ``out_uri`` (local or s3://): ``history`` is metrics.json's,
    ``checkpoints`` the job record's index (step, eval_loss, and accuracies when present)."""
    fig = loss_curve_figure(history, checkpoints, best=best, title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    storage.write_bytes(out_uri, buf.getvalue())


def _finite(v: Any) -> float:
    return float(v) if _is_number(v) and math.isfinite(v) else math.nan
