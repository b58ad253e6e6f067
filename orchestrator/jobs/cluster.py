"""Reaching a Ray cluster's HTTP APIs (Jobs, Serve) with its token, or starting a local head.

Every verb that talks to a cluster goes through here, so a laptop and a KubeRay cluster are one
code path: an address (``--address``, ``RAY_ADDRESS``, or the local head forge started), the
cluster's token (found the way Ray finds it), and Ray's own clients.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import ForgeError

Log = Callable[[str], None]
HEAD_FILE = "ray-head.json"
ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class ClusterError(ForgeError):
    """The cluster could not be reached, refused the token, or answered with an error."""


# --- addresses and the token ----------------------------------------------------------------


def forge_home() -> Path:
    """Where forge keeps per-user state (the local head's address): ``FORGE_HOME`` or ~/.forge."""
    return Path(os.environ.get("FORGE_HOME") or "~/.forge").expanduser()


def normalize_address(address: str) -> str:
    """The dashboard URL: ``host:port`` gets ``http://``; ``ray://`` (Ray Client) is refused."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ClusterError(f"{address}: a Ray Client address; forge talks to the Ray Jobs API, "
                           "the dashboard's URL (http://<head>:8265)")
    return address if "://" in address else f"http://{address}"


def explicit_address(address: str | None) -> str | None:
    """``--address``, else ``RAY_ADDRESS`` (as for ``ray job submit``), else None."""
    value = address or os.environ.get("RAY_ADDRESS")
    return normalize_address(value) if value else None


def auth_headers() -> dict[str, str]:
    """``Authorization: Bearer <token>`` with the token Ray itself would use (``RAY_AUTH_TOKEN``,
    the file at ``RAY_AUTH_TOKEN_PATH``, or ~/.ray/auth_token); empty when there is none or
    ``RAY_AUTH_MODE=disabled``. Sent explicitly so a client needs no ``RAY_AUTH_MODE=token``."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return {}
    return {"Authorization": f"Bearer {loader.get_raw_token(ignore_auth_mode=True)}"}


@contextlib.contextmanager
def _without_address_env() -> Iterator[None]:
    """Ray's clients let ``RAY_ADDRESS`` override the address they are given; forge's
    ``--address`` must win, so those variables are hidden while a client is built."""
    saved = {k: os.environ.pop(k) for k in ADDRESS_ENVS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def explain(address: str, e: Exception) -> ClusterError:
    """Ray's client errors as one message that says what to do (token, address, cluster down)."""
    text = str(e)
    if "401" in text or "Authentication required" in text:
        return ClusterError(
            f"the Ray cluster at {address} requires its token and none was found: put it in "
            "~/.ray/auth_token, or point RAY_AUTH_TOKEN_PATH at a file holding it (on the head, "
            "`ray get-auth-token` prints it)")
    if "403" in text or "Invalid authentication token" in text:
        return ClusterError(f"the Ray cluster at {address} rejected the token: it is not this "
                            "cluster's (check RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    if "Connection" in type(e).__name__ or "Connection" in text or "Max retries" in text:
        return ClusterError(f"cannot reach the Ray Jobs API at {address}: is the cluster up, and is "
                            "this its dashboard URL (http://<head>:8265)?")
    return ClusterError(f"the Ray cluster at {address}: {type(e).__name__}: {text.strip()}")


def job_client(address: str | None):
    """A ``JobSubmissionClient`` for ``address`` (None: inside a Ray job, the cluster it runs on)."""
    from ray.job_submission import JobSubmissionClient

    try:
        if address is None:
            return JobSubmissionClient(headers=auth_headers() or None)
        with _without_address_env():
            return JobSubmissionClient(address, headers=auth_headers() or None)
    except Exception as e:
        raise explain(address or "RAY_ADDRESS", e) from None


def serve_client(address: str):
    """The client ``serve deploy`` uses: Serve's REST API on the dashboard."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(address, headers=auth_headers() or None)
    except Exception as e:
        raise explain(address, e) from None


def call(address: str, fn: Callable[[], Any]) -> Any:
    """Run one request against the cluster, turning Ray's errors into a message for the user."""
    try:
        return fn()
    except ForgeError:
        raise
    except Exception as e:
        raise explain(address, e) from None


# --- the local head forge starts -------------------------------------------------------------


@dataclass
class LocalHead:
    """A ``ray start --head --block`` process forge started; SIGTERM to ``pid`` stops all of it."""

    address: str
    pid: int
    temp_dir: str
    log: str
    started: float

    def alive(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/cmdline", "rb") as f:
                return b"ray" in f.read()
        except OSError:  # no /proc (macOS): the pid answers signal 0
            try:
                os.kill(self.pid, 0)
                return True
            except OSError:
                return False


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_token() -> None:
    """Make sure a token exists before ``ray start --head``, which turns auth on only if one does."""
    from ray._raylet import AuthenticationTokenLoader

    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        subprocess.run([_ray_cli(), "get-auth-token", "--generate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        AuthenticationTokenLoader.instance().reset_cache()


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def local_cpus(need: float = 0.0) -> int:
    """Logical CPUs for a local head: the machine's, or enough for the largest job plus room for
    Ray Data and the trainer's controller (as ``forge train`` sizes its own local cluster)."""
    return max(os.cpu_count() or 1, math.ceil(need) + 2)


def start_local_head(num_cpus: int | None = None, env: dict[str, str] | None = None,
                     temp_dir: str | None = None, log: Log = print, timeout_s: float = 180.0,
                     remember: bool = True) -> LocalHead:
    """``ray start --head --block`` on loopback, free ports, token auth on, detached from this
    process; returns once its Jobs API answers. Its processes inherit ``env`` (default: this
    environment, so training workers and Serve replicas see the user's credentials), with this
    Python's ``bin`` first on PATH so ``forge train`` resolves to this installation."""
    ensure_token()
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="forge-ray-", dir="/tmp")  # short: socket paths
    names = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
             "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port")
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    cmd = [_ray_cli(), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--num-cpus={num_cpus or local_cpus()}", f"--temp-dir={temp_dir}",
           *(f"--{k}={v}" for k, v in ports.items())]
    child_env = dict(os.environ if env is None else env)
    for k in ADDRESS_ENVS:
        child_env.pop(k, None)
    child_env["RAY_AUTH_MODE"] = "token"
    child_env.setdefault("RAY_raylet_start_wait_time_s", "300")  # busy laptops and CI runners
    child_env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), child_env.get("PATH", "")])
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env,
                                start_new_session=True)
    head = LocalHead(address=f"http://127.0.0.1:{ports['dashboard-port']}", pid=proc.pid,
                     temp_dir=temp_dir, log=log_path, started=time.time())
    log(f"ray: starting a local Ray head at {head.address} (pid {head.pid}, logs {log_path})")
    try:
        _wait_ready(head, proc, timeout_s)
    except BaseException:
        stop_local_head(head, forget=False, remove_files=False)  # keep the logs the error names
        raise
    if remember:
        forge_home().mkdir(parents=True, exist_ok=True)
        (forge_home() / HEAD_FILE).write_text(json.dumps(asdict(head), indent=2) + "\n")
    return head


def _wait_ready(head: LocalHead, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    headers = auth_headers()
    while True:
        if proc.poll() is not None:
            tail = Path(head.log).read_text(errors="replace").splitlines()[-15:]
            raise ClusterError("the local Ray head exited while starting:\n  " + "\n  ".join(tail))
        # The dashboard answers before the node has registered; `ray start` prints this after.
        started = "Ray runtime started" in Path(head.log).read_text(errors="replace")
        try:
            req = urllib.request.Request(f"{head.address}/api/version", headers=headers)
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200 and started:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise ClusterError(f"the local Ray head did not answer within {timeout_s:.0f} s "
                               f"(logs in {head.log})")
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the head's process group (GCS, raylet, dashboard, ...) still runs."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def remembered_head() -> LocalHead | None:
    """The local head a previous ``forge submit`` started, if it still runs."""
    path = forge_home() / HEAD_FILE
    try:
        head = LocalHead(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return head if head.alive() else None


def stop_local_head(head: LocalHead, timeout_s: float = 60.0, forget: bool = True,
                    remove_files: bool = True) -> None:
    """SIGTERM to the ``ray start --block`` process, which stops every process of that head (and
    only those: never ``ray stop``, which stops every Ray on the machine)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(head.pid, signal.SIGTERM)
    deadline = time.time() + timeout_s
    while (head.alive() or _group_alive(head.pid)) and time.time() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(head.pid, os.WNOHANG)
        time.sleep(0.3)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(head.pid, signal.SIGKILL)  # whatever of that head outlived the deadline
    if remove_files and os.path.basename(head.temp_dir).startswith("forge-ray-"):  # forge made it
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    if forget:
        path = forge_home() / HEAD_FILE
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == head.pid:
                path.unlink()
