"""Losing a worker node: a ray.cluster_utils.Cluster (a head and two `cpu_node` workers on this machine) loses one
node, killed without warning, in the middle of each job.

* generation: engines and retriever shards are spread over both workers (placement groups, SPREAD); the E-step
  still writes every example exactly once;
* training: two Ray Train workers on two nodes; the run restarts from its last checkpoint and finishes;
* retriever and sandbox actors come back on the surviving node (`max_restarts`), and calls sent to the dead ones are
  retried (`max_task_retries`), except programs, which are not idempotent and come back as a typed error.

Everything runs in one subprocess: a process joins one Ray cluster at a time and the rest of the suite shares another,
and one cluster for the three scenarios costs one start-up instead of three. Each scenario reports what it saw as
JSON (or the traceback it died with), and each test checks one scenario.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import json, os, random, sys, threading, time, traceback
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    from actors.config import EngineConfig, RetrieverConfig, SandboxConfig
    from actors.llm import start_engines
    from actors.retriever import ShardedRetriever, build_index_in_process
    from actors.sandbox import SandboxPool
    from actors.tools import ToolRegistry
    from cluster.resources import Placement
    from pipelines import records
    from pipelines.data.world import WorldConfig, build_world
    from pipelines.generate import EStepConfig, run_exsearch_estep
    from pipelines.train import TrainSettings, run_training

    model_path, work = sys.argv[1], Path(sys.argv[2])
    # A dead raylet is noticed by the GCS's health checks; Ray's defaults take ~30 s, these a few seconds.
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_timeout_ms": 2000,
              "health_check_failure_threshold": 4}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "_system_config": health})
    WORKER = {"num_cpus": 1, "resources": {"cpu_node": 1}}  # the head has no cpu_node: roles stay off it
    for _ in range(2):
        cluster.add_node(**WORKER)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    SPREAD = {"resources": {"cpu_node": 0.01}, "placement_strategy": "SPREAD"}
    world = build_world(WorldConfig(people_per_split=10, companies_per_split=5, cities_per_split=4,
                                    train_questions=24, dev_questions=2, test_questions=2))


    def node_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=120)


    def pid_of(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=120)


    def kill_node(node_id, wait=True):
        '''SIGKILL every process of a worker node (raylet, object store, workers): a machine that vanished. With
        `wait`, return once the GCS has declared it dead (its workers may serve a moment longer until then).'''
        (node,) = [n for n in cluster.worker_nodes if n.node_id == node_id]
        cluster.remove_node(node, allow_graceful=False)
        deadline = time.time() + 60
        while wait and time.time() < deadline and any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id):
            time.sleep(0.2)


    def busiest(node_ids):
        return max(set(node_ids), key=node_ids.count)


    def reset():
        '''Back to a head and two live workers, with no actor or placement group left from the last scenario.'''
        for pg_id, info in placement_group_table().items():
            if info["state"] != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        while len(cluster.worker_nodes) < 2:
            cluster.add_node(**WORKER)
        cluster.wait_for_nodes()


    def scenario(fn):
        started = time.monotonic()
        try:
            out = fn()
        except Exception:
            out = {"error": traceback.format_exc()[-3000:]}
        out["seconds"] = round(time.monotonic() - started, 1)
        print("RESULT " + json.dumps({fn.__name__: out}), flush=True)


    def generation():
        agent = {"max_steps": 2, "max_tokens_per_turn": 16, "max_context_tokens": 512, "top_k": 2}
        retriever_cfg = RetrieverConfig(kind="bm25", num_shards=2, num_cpus=0.1, **SPREAD)
        index = build_index_in_process(world.documents(), retriever_cfg, work / "index")
        retriever = ShardedRetriever.launch(index, retriever_cfg)
        engines = start_engines(model_path, EngineConfig(num_actors=2, num_cpus=0.25, max_model_len=512, **SPREAD))
        engine_nodes = [node_of(e) for e in engines]
        shard_nodes = [node_of(h) for h in retriever.handles]
        pids_before = [pid_of(e) for e in engines]
        victim = busiest(engine_nodes + shard_nodes)
        questions = world.questions("train")[:24]  # 6 shards: work is left when the first one lands
        out_dir = work / "estep"
        box = {}

        def job():
            try:
                box["summary"] = run_exsearch_estep(questions, out_dir, engines, retriever, model_path, agent,
                                                    EStepConfig(samples_per_question=2, shard_size=4, batch_size=2))
            except Exception:
                box["error"] = traceback.format_exc()[-3000:]

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.time() + 180
        while not list(out_dir.glob("shard-*.parquet")) and time.time() < deadline and thread.is_alive():
            time.sleep(0.05)
        shards_before = len(list(out_dir.glob("shard-*.parquet")))  # written when the node was killed
        kill_node(victim)
        thread.join(timeout=300)
        if "summary" not in box:
            return {"error": box.get("error", "the E-step did not finish within 300 s")}
        ids = records.read_records(out_dir, "weighted_sample").column("example_id").to_pylist()
        out = {"victim": victim, "engine_nodes": engine_nodes, "engines_on_victim": engine_nodes.count(victim),
               "shards_on_victim": shard_nodes.count(victim), "shards_before": shards_before,
               "shards_total": box["summary"].shards_written, "expected": [q["id"] for q in questions], "ids": ids,
               "engine_nodes_after": [node_of(e) for e in engines],
               "shard_nodes_after": [node_of(h) for h in retriever.handles],
               "victim_alive": [n["Alive"] for n in ray.nodes() if n["NodeID"] == victim],
               "engine_pids_before": pids_before, "engine_pids_after": [pid_of(e) for e in engines]}
        for engine in engines:
            ray.kill(engine, no_restart=True)
        retriever.close()
        return out


    def training():
        rng = random.Random(0)
        rows = [{"prompt_ids": [5, 6, 7], "token_ids": [rng.randrange(10, 300) for _ in range(6)],
                 "loss_mask": [1] * 6, "weight": 1.0} for _ in range(32)]
        settings = TrainSettings(model_path=model_path, objective="sft", batch_size=8, micro_batch_size=4, epochs=2,
                                 checkpoint_every=2, report_every=1)
        placement = Placement(num_cpus=0.5, resources={"cpu_node": 0.01}, strategy="SPREAD", where="trainer")
        csv_path = work / "train_metrics.csv"
        box = {}

        def job():
            try:
                box["result"] = run_training(rows, settings, work, num_workers=2, max_failures=2, name="train",
                                             placement=placement)
            except Exception:
                box["error"] = traceback.format_exc()[-3000:]

        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        deadline = time.time() + 180
        while time.time() < deadline and thread.is_alive():
            lines = csv_path.read_text().strip().splitlines()[1:] if csv_path.exists() else []
            if lines and int(lines[-1].split(",")[0]) >= 4:
                break
            time.sleep(0.05)
        # Both cpu_node workers hold one Ray Train worker (the history's `nodes` column says so): kill either.
        kill_node(next(iter(cluster.worker_nodes)).node_id)
        thread.join(timeout=300)
        if "result" not in box:
            return {"error": box.get("error", "training did not finish within 300 s")}
        result = box["result"]
        return {"history": [{"step": int(r["step"]), "loss": r["loss"], "nodes": int(r["nodes"])}
                            for r in result.history],
                "total_steps": 8, "checkpoint_every": 2, "checkpoint": Path(result.checkpoint).is_dir()}


    def actors():
        retriever_cfg = RetrieverConfig(kind="bm25", num_shards=2, num_cpus=0.1, **SPREAD)
        retriever = ShardedRetriever.launch(work / "index", retriever_cfg)  # the index the generation scenario built
        registry = ToolRegistry.from_functions(world.tools(), world.tool_functions())
        pool = SandboxPool(registry, SandboxConfig(num_actors=2, num_cpus=0.1, wall_time_s=5.0, request_timeout_s=90,
                                                   **SPREAD))
        queries = [q["question"] for q in world.questions("train")[:8]]
        call = {"name": "calculate", "arguments": {"operation": "add", "a": 2, "b": 3}}
        ids = lambda hits: [[h["id"] for h in per_query] for per_query in hits]
        hits_before = ids(retriever.search(queries, 3))
        shard_nodes = [node_of(h) for h in retriever.handles]
        sandbox_nodes = [node_of(a) for a in pool.actors]
        shard_pids = [info["pid"] for info in retriever.wait_ready()]
        victim = busiest(shard_nodes + sandbox_nodes)
        programs = {}
        runner = threading.Thread(target=lambda: programs.update(results=pool.run_programs(
            ["import time\\ntime.sleep(3)\\nprint('done')"] * 2)), daemon=True)
        runner.start()
        time.sleep(1.0)  # both programs are running, one of them on the victim
        kill_node(victim, wait=False)
        # Sent to the dead actors before Ray has noticed: Ray restarts them and retries these idempotent calls.
        hits_after = ids(retriever.search(queries, 3))
        calls_after = [r.output for r in pool.map([call] * 6)]
        runner.join(timeout=120)
        out = {"victim": victim, "shards_on_victim": shard_nodes.count(victim),
               "sandboxes_on_victim": sandbox_nodes.count(victim), "hits_before": hits_before,
               "hits_after": hits_after, "calls_after": calls_after,
               "programs": sorted((r.stdout, r.error.code if r.error else None) for r in programs["results"]),
               "shard_nodes_after": [node_of(h) for h in retriever.handles],
               "sandbox_nodes_after": [node_of(a) for a in pool.actors],
               "shard_pids_before": shard_pids, "shard_pids_after": [i["pid"] for i in retriever.wait_ready()],
               "sandboxes_replaced": pool.replaced}
        retriever.close()
        pool.shutdown()
        return out


    for fn in (generation, training, actors):
        if fn is not generation:
            reset()
        scenario(fn)
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.fixture(scope="module")
def node_loss(tiny_policy, tmp_path_factory):
    """What each scenario saw, by name (run once for the module)."""
    work = tmp_path_factory.mktemp("node_loss")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_policy), str(work)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    results: dict = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            results.update(json.loads(line[len("RESULT "):]))
    results["stderr"] = done.stderr[-4000:]
    return results


def _scenario(node_loss: dict, name: str) -> dict:
    assert name in node_loss, f"the {name} scenario never reported; stderr:\n{node_loss['stderr']}"
    out = node_loss[name]
    assert "error" not in out, out["error"]
    print(f"{name}: {out['seconds']} s")
    return out


@pytest.mark.slow
def test_generation_survives_a_lost_node_with_every_example_once(node_loss):
    out = _scenario(node_loss, "generation")
    assert out["engines_on_victim"] >= 1 and out["shards_on_victim"] >= 1  # the lost node held both roles
    assert out["shards_before"] < 6  # the node died with work still to do
    assert out["shards_total"] == 6
    assert sorted(set(out["ids"])) == sorted(out["expected"])
    assert all(out["ids"].count(example_id) == 2 for example_id in out["expected"])  # 2 samples each, no more
    assert out["victim_alive"] == [False]
    assert out["victim"] not in out["engine_nodes_after"] + out["shard_nodes_after"], out  # restarted elsewhere
    restarted = [i for i, node in enumerate(out["engine_nodes"]) if node == out["victim"]]
    assert all(out["engine_pids_after"][i] != out["engine_pids_before"][i] for i in restarted)


@pytest.mark.slow
def test_training_restarts_from_the_last_checkpoint_after_a_lost_node(node_loss):
    out = _scenario(node_loss, "training")
    history = out["history"]
    steps = [row["step"] for row in history]
    assert out["checkpoint"] and sorted(set(steps)) == list(range(1, out["total_steps"] + 1))
    assert history[0]["nodes"] == 2  # the two workers started on the two worker nodes
    restart = next(i for i, row in enumerate(history) if row["nodes"] == 1)  # after the loss: one node left
    resumed_at = steps[restart]
    assert resumed_at > 1 and (resumed_at - 1) % out["checkpoint_every"] == 0  # from a checkpoint, not from scratch
    assert steps[restart:] == list(range(resumed_at, out["total_steps"] + 1))
    first_try = {row["step"]: row["loss"] for row in history[:restart]}
    for row in history[restart:]:  # a step run twice, from the same checkpoint on the same data, has the same loss
        if row["step"] in first_try:
            assert row["loss"] == pytest.approx(first_try[row["step"]], abs=1e-5)


@pytest.mark.slow
def test_retriever_and_sandbox_actors_come_back_and_retry_idempotent_calls(node_loss):
    out = _scenario(node_loss, "actors")
    assert out["shards_on_victim"] >= 1 and out["sandboxes_on_victim"] >= 1
    assert out["hits_after"] == out["hits_before"]  # the retried search, on the restarted shard, answers the same
    assert out["calls_after"] == ["5"] * 6
    assert out["victim"] not in out["shard_nodes_after"] + out["sandbox_nodes_after"]
    assert out["shard_pids_after"] != out["shard_pids_before"]
    # the program on the lost node is not re-run (not idempotent): it comes back as a typed error; the other finishes
    assert out["programs"] == [["", "sandbox_unavailable"], ["done\n", None]]
