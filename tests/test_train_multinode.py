"""Ray Train across nodes: a head and two worker nodes simulated with ray.cluster_utils.Cluster on this machine.

It runs in a subprocess because a process joins one Ray cluster at a time and the rest of the suite shares another.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import json, random, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.train import TrainSettings, run_training

    model_path, out = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rng = random.Random(0)
    rows = []
    for i in range(32):
        tokens = [rng.randrange(10, 300) for _ in range(6)]
        rows.append({"prompt_ids": [5, 6, 7], "token_ids": tokens, "loss_mask": [1] * 6, "weight": 1.0})
    settings = TrainSettings(model_path=model_path, objective="sft", batch_size=8, micro_batch_size=4, epochs=1,
                             report_every=2)
    result = run_training(rows, settings, out, num_workers=2, cpus_per_worker=0.5, placement_strategy="SPREAD")
    print("RESULT " + json.dumps({"checkpoint": str(result.checkpoint), "nodes": len(ray.nodes())}))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_workers_on_two_nodes(tiny_policy, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_policy), str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["nodes"] == 3
    with open(tmp_path / "train_metrics.csv") as handle:
        history = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in history] == [1, 2, 3, 4]
    assert {row["nodes"] for row in history} == {"2"}  # the two workers reported from two different nodes
    assert float(history[-1]["loss"]) < float(history[0]["loss"])
