"""Placement from config (cluster/resources.py): the options Ray gets, the errors a user gets, and where actors land.

The multi-node test starts our real actors through their launchers (start_engines, ShardedRetriever.launch, SandboxPool)
and a Ray Train worker on a ray.cluster_utils.Cluster whose two worker nodes advertise different custom resources,
in a subprocess: a process joins one Ray cluster at a time and the rest of the suite shares another.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from actors.config import EngineConfig, RetrieverConfig, SandboxConfig
from cluster.resources import Placement
from pipelines.config import TrainerConfig
from tests.conftest import REPO


def test_default_configs_ask_for_what_they_asked_before():
    # Today's call sites pass num_cpus / num_gpus only; the defaults must keep it that way (no custom resources, no
    # placement group), so nothing changes on a laptop.
    engine = Placement.of_actor(EngineConfig(), "engine")
    assert engine.actor_options() == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert engine.reserve(2).options == [{"num_cpus": 0.5, "num_gpus": 0.0}] * 2
    assert Placement.of_actor(RetrieverConfig(), "retriever").actor_options() == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert Placement.of_actor(SandboxConfig(), "sandbox").actor_options() == {"num_cpus": 0.25, "num_gpus": 0.0}
    trainer = Placement.of_trainer(TrainerConfig())
    assert trainer.scaling_config(1) == {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 0.5},
                                         "placement_strategy": "PACK"}  # fmt: skip


def test_cluster_knobs_become_ray_options():
    engine = Placement.of_actor(EngineConfig(num_cpus=4, num_gpus=1, resources={"gpu_node": 0.01},
                                             accelerator_type="A100", placement_strategy="SPREAD"), "engine")  # fmt: skip
    assert engine.actor_options() == {"num_cpus": 4.0, "num_gpus": 1.0, "resources": {"gpu_node": 0.01},
                                      "accelerator_type": "A100"}  # fmt: skip
    assert engine.bundle() == {"CPU": 4.0, "GPU": 1.0, "gpu_node": 0.01, "accelerator_type:A100": 0.001}
    trainer = Placement.of_trainer(TrainerConfig(num_workers=8, cpus_per_worker=4, use_gpu=True,
                                                 resources_per_worker={"gpu_node": 0.01}, accelerator_type="H100",
                                                 placement_strategy="SPREAD"))  # fmt: skip
    kwargs = trainer.scaling_config(8)
    assert kwargs["resources_per_worker"] == {"CPU": 4.0, "gpu_node": 0.01, "GPU": 1.0}
    import ray.train

    scaling = ray.train.ScalingConfig(**kwargs)  # Ray accepts exactly what we build
    assert scaling.use_gpu and scaling.placement_strategy == "SPREAD" and scaling.accelerator_type == "H100"


def test_hydra_overrides_reach_the_placement():
    from hydra import compose, initialize_config_dir

    from pipelines import config as _config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=["+engine.resources.gpu_node=0.01", "engine.placement_strategy=STRICT_PACK",
                                           "+retriever.resources.cpu_node=0.01",
                                           "+trainer.resources_per_worker.gpu_node=0.01"])  # fmt: skip
    assert Placement.of_actor(cfg.engine, "engine").bundle() == {"CPU": 0.5, "gpu_node": 0.01}
    assert Placement.of_actor(cfg.engine, "engine").strategy == "STRICT_PACK"
    assert Placement.of_actor(cfg.retriever, "retriever").actor_options()["resources"] == {"cpu_node": 0.01}
    assert Placement.of_trainer(cfg.trainer).scaling_config(1)["resources_per_worker"] == {"CPU": 0.5, "gpu_node": 0.01}


@pytest.mark.parametrize(("changes", "message"), [
    ({"placement_strategy": "PACKED"}, r"engine.placement_strategy='PACKED' is not one of"),
    ({"resources": {"CPU": 1}}, r"engine.resources\['CPU'\]: CPU has its own key \(engine.num_cpus"),
    ({"resources": {"gpu_node": 1.5}}, r"engine.resources\['gpu_node'\]=1.5: Ray takes fractions only below 1"),
    ({"resources": {"gpu_node": -1}}, r"engine.resources\['gpu_node'\]=-1.0 must be a finite number >= 0"),
    ({"num_cpus": float("nan")}, r"engine.num_cpus=nan must be"),
])  # fmt: skip
def test_bad_placement_names_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        Placement.of_actor(EngineConfig(**changes), "engine")


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    from actors.config import EngineConfig, RetrieverConfig, SandboxConfig
    from actors.llm import start_engines
    from actors.retriever import ShardedRetriever, build_index_in_process
    from actors.sandbox import SandboxPool
    from actors.tools import ToolRegistry
    from cluster.resources import Placement, PlacementError
    from pipelines.config import TrainerConfig
    from pipelines.data.world import WorldConfig, build_world

    model_path, index_dir = sys.argv[1], sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # nothing may land on the head by chance
    gpu = cluster.add_node(num_cpus=2, resources={"gpu_node": 1, "accelerator_type:A10G": 1})
    cpu = cluster.add_node(num_cpus=2, resources={"cpu_node": 1})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    node_of = lambda actor: ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    out = {"gpu_node": gpu.node_id, "cpu_node": cpu.node_id}

    # an engine on the GPU node type (custom resource + accelerator type), answering from there
    engine_cfg = EngineConfig(max_model_len=512, resources={"gpu_node": 0.01}, accelerator_type="A10G")
    (engine,) = start_engines(model_path, engine_cfg)
    generated = ray.get(engine.generate.remote([[5, 6, 7]], {"max_tokens": 3, "temperature": 0}), timeout=300)
    out["engine"] = {"node": node_of(engine), "tokens": len(generated[0].completions[0].token_ids)}

    # a retriever and a sandbox on the CPU node type
    world = build_world(WorldConfig(people_per_split=10, companies_per_split=5, cities_per_split=4, train_questions=5,
                                    dev_questions=2, test_questions=2))
    retriever_cfg = RetrieverConfig(kind="bm25", resources={"cpu_node": 0.01})
    build_index_in_process(world.documents(), retriever_cfg, index_dir)
    (retriever,) = ShardedRetriever.launch(index_dir, retriever_cfg).handles
    hits = ray.get(retriever.search.remote([world.documents()[0]["text"]], 3), timeout=300)
    out["retriever"] = {"node": node_of(retriever), "hits": len(hits[0])}
    registry = ToolRegistry.from_functions(world.tools(), world.tool_functions())
    sandbox_cfg = SandboxConfig(num_actors=1, resources={"cpu_node": 0.01})
    (sandbox,) = SandboxPool(registry, sandbox_cfg).actors
    result = ray.get(sandbox.call.remote({"name": "no_such_tool", "arguments": {}}), timeout=300)
    out["sandbox"] = {"node": node_of(sandbox), "error": result.error.code if result.error else None}

    # placement groups: two sandboxes STRICT_SPREAD land on two nodes, STRICT_PACK on one
    for strategy in ("STRICT_SPREAD", "STRICT_PACK"):
        pool = SandboxPool(registry, SandboxConfig(num_actors=2, num_cpus=0.25, placement_strategy=strategy))
        out[strategy] = len({node_of(a) for a in pool.actors})
        for a in pool.actors:
            ray.kill(a)
        pool._placed.release()

    # a group that cannot fit fails with the key, not a hang
    try:
        Placement.of_actor(EngineConfig(resources={"cpu_node": 0.5}, placement_strategy="STRICT_SPREAD"),
                           "engine").reserve(2, timeout_s=5)
        out["infeasible"] = None
    except PlacementError as error:
        out["infeasible"] = str(error)

    # a Ray Train worker on the GPU node type through ScalingConfig
    import ray.train
    from ray.train.torch import TorchTrainer

    def where(config):  # the nodes share this machine's disk, so the worker can leave its node id in a file
        with open(config["path"], "w") as handle:
            handle.write(ray.get_runtime_context().get_node_id())

    trainer_cfg = TrainerConfig(resources_per_worker={"gpu_node": 0.01})
    TorchTrainer(where, train_loop_config={"path": index_dir + "-worker-node"},
                 scaling_config=ray.train.ScalingConfig(**Placement.of_trainer(trainer_cfg).scaling_config(1)),
                 run_config=ray.train.RunConfig(name="placement", storage_path=index_dir + "-train")).fit()
    out["trainer"] = {"node": open(index_dir + "-worker-node").read()}
    print("RESULT " + json.dumps(out))
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_roles_land_on_their_node_types(tiny_policy, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_policy), str(tmp_path / "index")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["engine"]["node"] == out["gpu_node"] and out["engine"]["tokens"] == 3
    assert out["trainer"]["node"] == out["gpu_node"]
    assert out["retriever"]["node"] == out["cpu_node"] and out["retriever"]["hits"] == 3
    assert out["sandbox"]["node"] == out["cpu_node"] and out["sandbox"]["error"] == "unknown_tool"
    assert out["STRICT_SPREAD"] == 2 and out["STRICT_PACK"] == 1
    assert out["infeasible"] and "engine: 2 bundle(s)" in out["infeasible"] and "STRICT_SPREAD" in out["infeasible"]
