"""What every `@hydra.main` entry point does first: find its output folder, save its config, reach Ray."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cluster.connect import ClusterInfo, connect

log = logging.getLogger(__name__)


def output_dir(cfg: DictConfig) -> Path:
    """`output_dir` from the config, else Hydra's run directory, else ./outputs/run (plain function calls)."""
    if cfg.get("output_dir"):
        folder = Path(cfg.output_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            folder = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # not under @hydra.main
            folder = Path("outputs/run")
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


def start_job(cfg: DictConfig) -> tuple[Path, ClusterInfo]:
    """Save the resolved config beside the results, then connect to Ray and say what we got."""
    out = output_dir(cfg)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    for name, value in cfg.cluster.env_vars.items():
        os.environ.setdefault(name, str(value))
    info = connect(cfg.cluster)
    print(info.describe(), flush=True)
    print(f"Output folder: {out}", flush=True)
    return out, info


def plain_config(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
