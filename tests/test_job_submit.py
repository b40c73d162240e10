"""Job submission against a real head started with `ray start --head` (token auth on), as the README documents it.

The head gets its own ports, temp dir and token (RAY_AUTH_TOKEN in its environment and ours), so it neither meets
the suite's cluster nor reads ~/.ray/auth_token. It is stopped by signalling the `ray start --block` process this test
started (which takes its Ray processes down with it), never with `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from ray.runtime_env.runtime_env import _merge_runtime_env

from cluster.config import ClusterConfig
from cluster.connect import runtime_env
from tests.conftest import REPO
from tests.ports import free_ports

RAY = Path(sys.executable).with_name("ray")


class Head:
    """A one-CPU Ray head in its own process group, reachable at `url` with `token`."""

    def __init__(self, workdir: Path):
        gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
        self.url = f"http://127.0.0.1:{dashboard}"
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
        self.env.pop("RAY_ADDRESS", None)
        self.log = open(workdir / "ray-start.log", "w+")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
             f"--temp-dir={workdir / 'ray'}", "--disable-usage-stats"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def get(self, path: str, token: str | None = None) -> int:
        request = urllib.request.Request(self.url + path)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if self.get("/api/version", self.token) == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        self.log.seek(0)
        raise AssertionError(f"ray start --head did not come up:\n{self.log.read()[-4000:]}")

    def ray(self, *args: str, token: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        env = dict(self.env, RAY_AUTH_TOKEN=token or self.token)
        return subprocess.run([str(RAY), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)

    def job(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.ray("job", args[0], "--address", self.url, *args[1:], **kwargs)

    def status(self, job_id: str) -> str:
        """The job's status from the job REST API (what `ray job status` prints in prose)."""
        request = urllib.request.Request(f"{self.url}/api/jobs/{job_id}",
                                         headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["status"]

    def wait_status(self, job_id: str, wanted: set[str], timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        status = self.status(job_id)
        while status not in wanted and time.monotonic() < deadline:
            time.sleep(1)
            status = self.status(job_id)
        return status

    def stop(self) -> None:
        """SIGTERM to our `ray start --block`: it stops the processes it started; then our own group, if any is left."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the session this test created, by its id
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.log.close()


def test_a_submitted_jobs_runtime_env_is_extended_not_contradicted():
    # `ray job submit --working-dir .` ships the code itself; ray.init may not name a working_dir again, nor an env var
    # the job set (Ray refuses the driver's ray.init otherwise), and a job without one still gets the repo shipped
    job = {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {"OMP_NUM_THREADS": "4"}}
    env = runtime_env(ClusterConfig(), remote=True, submitted=job)
    assert "working_dir" not in env and "excludes" not in env
    assert "OMP_NUM_THREADS" not in env["env_vars"] and env["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert _merge_runtime_env(job, env) is not None  # what ray.init does with the two
    assert runtime_env(ClusterConfig(), remote=True, submitted={})["working_dir"] == str(REPO)


@pytest.fixture
def head():
    workdir = Path(tempfile.mkdtemp(prefix="tsjob"))  # short: Ray's socket paths must fit in 107 bytes
    head = Head(workdir)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.slow
def test_submit_fetch_logs_and_stop_jobs_with_token_auth(head):
    # token auth is on: the dashboard and job API refuse requests without the token or with a wrong one
    assert head.get("/api/version") == 401
    assert head.get("/api/version", "not-the-token") == 403
    refused = head.job("list", token="not-the-token")
    assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

    # the code ships as the working dir and imports there; a job's driver joins the cluster (RAY_ADDRESS, the token)
    # through cluster.connect, as the main job does, and runs a task on it
    imports = head.job("submit", "--working-dir", ".", "--submission-id", "imports", "--",
                       "python", "-c", "import actors, agents, pipelines, cluster; print('ok')")  # fmt: skip
    assert imports.returncode == 0, imports.stdout[-3000:] + imports.stderr[-3000:]
    assert "ok" in imports.stdout.splitlines()
    program = ("import json, ray; from cluster.config import ClusterConfig; from cluster.connect import connect; "
               "info = connect(ClusterConfig()); print('JOINED', json.dumps([info.local, info.nodes])); "
               "print('TASK', ray.get(ray.remote(num_cpus=1)(lambda: 'ran').remote(), timeout=120))")  # fmt: skip
    joined = head.job("submit", "--working-dir", ".", "--submission-id", "connect", "--", "python", "-c", program)
    assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]
    assert head.status("connect") == "SUCCEEDED"
    logs = head.job("logs", "connect").stdout
    assert json.loads(re.search(r"JOINED (.*)", logs).group(1)) == [False, 1]  # joined, did not start its own Ray
    assert "TASK ran" in logs

    # a long job is listed as running, its logs stream, and `ray job stop` ends it
    started = head.job("submit", "--no-wait", "--working-dir", ".", "--submission-id", "sleeper", "--",
                       "python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)")  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    assert head.wait_status("sleeper", {"RUNNING"}) == "RUNNING"
    deadline = time.monotonic() + 60
    while "sleeping" not in head.job("logs", "sleeper").stdout and time.monotonic() < deadline:
        time.sleep(1)
    assert "sleeping" in head.job("logs", "sleeper").stdout
    stopped = head.job("stop", "sleeper")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert head.wait_status("sleeper", {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    listed = head.job("list").stdout
    assert "sleeper" in listed and "imports" in listed

    # the browser's way into the dashboard: POST the token once, then a cookie carries it
    request = urllib.request.Request(head.url + "/api/authenticate", method="POST",
                                     headers={"Authorization": f"Bearer {head.token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert "ray-authentication-token=" in response.headers.get("Set-Cookie", "")
