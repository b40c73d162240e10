"""`python -m pipelines.status <run folder>`: what a run of the main job has done, what it measured, what is left.

It reads only the folder (no Ray, no model), so it answers while the job is still running, after it stopped, or on a
copy of the folder on a laptop. The layout is the one `pipelines.run` writes with the ExSearch recipe
(pipelines/recipes/exsearch.py): `config.yaml`, the world's `data/`, `policy/`, `index/`, `iter-00-warm-start/`, one
`iter-NN-<variant>/` per EM iteration (E-step shards under `estep/`, the M-step's Ray Train run under `ray_train/`
and its `mstep_metrics.csv`, `result.json` written last), then `results.md` / `results.csv` and the curves. An
iteration counts as done only when its `result.json` exists, as it does for the recipe's resume.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.data.export import world_folders
from pipelines.recipes.exsearch import _row
from pipelines.report import markdown_table
from pipelines.shards import QUARANTINE

WARM_START = "iter-00-warm-start"
ITERATION = re.compile(r"^iter-(\d{2,})-(.+)$")
REPORT_FILES = ("results.md", "results.csv", "curve_em.png", "curve_f1.png")


class NotARunFolderError(ValueError):
    """The folder lacks what every run of the main job writes first; the message names the folder and the file."""


@dataclass
class StepStatus:
    """One iteration folder: finished or how far it got."""

    variant: str
    iteration: int
    folder: str
    done: bool
    estep: str
    """`complete (N samples)`, `k shard(s), up to n planned`, `not started`, or `-` (the warm start and the
    `demonstrations` control have none)."""
    train_steps: int
    """Optimizer steps in the iteration's training metrics CSV (the M-step, or the warm start's SFT)."""
    checkpoints: int
    quarantined: int


@dataclass
class RunStatus:
    folder: str
    recipe: str
    variants: list[str]
    iterations: int
    """Planned EM iterations per variant (after the warm start)."""
    steps: list[StepStatus] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    """One row per variant and finished iteration (iteration 0 = the warm start), as results.csv has them."""
    artefacts: dict[str, str | None] = field(default_factory=dict)
    """What each artefact holds, or None when it is absent."""
    unfinished: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return not self.unfinished


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _train_steps(folder: Path, name: str) -> int:
    """Rows of `<name>_metrics.csv`: the optimizer steps run so far (one row per step)."""
    path = folder / f"{name}_metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def _checkpoints(folder: Path, name: str) -> int:
    run = folder / "ray_train" / name
    return len([p for p in run.glob("checkpoint_*") if p.is_dir()]) if run.is_dir() else 0


def _estep(folder: Path, planned_shards: int) -> str:
    estep = folder / "estep"
    manifest = _read_json(estep / "manifest.json")
    if manifest is not None:
        return f"complete ({manifest.get('count', '?')} samples)"
    shards = len(list(estep.glob("shard-*.parquet"))) if estep.is_dir() else 0
    return f"{shards} shard(s), up to {planned_shards} planned" if shards else "not started"


def _step(out: Path, folder_name: str, variant: str, iteration: int, planned_shards: int) -> StepStatus:
    folder = out / folder_name
    warm = iteration == 0
    name = "sft" if warm else "mstep"
    return StepStatus(
        variant=variant, iteration=iteration, folder=folder_name, done=(folder / "result.json").is_file(),
        estep="-" if warm or variant == "demonstrations" else _estep(folder, planned_shards),
        train_steps=_train_steps(folder, name),
        checkpoints=_checkpoints(folder, name), quarantined=_count_lines(folder / "estep" / QUARANTINE),
    )  # fmt: skip


def _artefacts(out: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {"config.yaml": "resolved config"}
    if (out / "data").is_dir():
        folders = world_folders(out / "data")
        complete = [name for name, path in folders.items() if (path / "manifest.json").is_file()]
        found["data/"] = f"{len(complete)} of {len(folders)} dataset folders complete"
    else:
        found["data/"] = None
    found["datasets.md"] = "row and token counts" if (out / "datasets.md").is_file() else None
    found["policy/"] = "the starting policy (HF folder)" if (out / "policy" / "config.json").is_file() else None
    index = _read_json(out / "index" / "manifest.json")
    found["index/"] = (f"{index.get('kind')} index, {index.get('count')} passages in {index.get('num_shards')} "
                       f"shard(s)" if index else None)  # fmt: skip
    for name in REPORT_FILES:
        found[name] = "written" if (out / name).is_file() else None
    return found


def summarize(folder: str | Path) -> RunStatus:
    """Read a run folder of `python -m pipelines.run`; NotARunFolderError when it is not one."""
    out = Path(folder)
    if not out.is_dir():
        raise NotARunFolderError(f"{out}: no such folder")
    config_path = out / "config.yaml"
    if not config_path.is_file():
        raise NotARunFolderError(f"{out}: no config.yaml, so not a run folder of pipelines.run (it writes that first)")
    cfg = OmegaConf.load(config_path)
    recipe = OmegaConf.select(cfg, "recipe.name")
    if recipe != "exsearch":
        raise NotARunFolderError(f"{config_path}: recipe.name={recipe!r}; pipelines.status reads exsearch runs")
    variants = list(cfg.recipe.variants)
    iterations = int(cfg.recipe.iterations)
    planned_shards = math.ceil(int(cfg.recipe.estep_questions) / int(cfg.recipe.estep.shard_size))
    status = RunStatus(str(out.resolve()), recipe, variants, iterations, artefacts=_artefacts(out))

    warm = _step(out, WARM_START, "warm-start", 0, planned_shards)
    status.steps.append(warm)
    warm_result = _read_json(out / WARM_START / "result.json")
    if warm_result is None:
        status.unfinished.append(
            f"warm start: not finished ({warm.train_steps} of {cfg.recipe.warm_start_steps} SFT steps logged, "
            f"{warm.checkpoints} checkpoint(s)); every EM iteration starts from it"
        )
    if warm_result is not None:  # the recipe's order: the shared warm start once per variant, then each chain
        status.metrics.extend({"variant": variant, "iteration": 0, **_row(warm_result)} for variant in variants)
    for variant in variants:
        missing = []
        for iteration in range(1, iterations + 1):
            step = _step(out, f"iter-{iteration:02d}-{variant}", variant, iteration, planned_shards)
            status.steps.append(step)
            result = _read_json(out / step.folder / "result.json")
            if result is not None:
                status.metrics.append({"variant": variant, "iteration": iteration, **_row(result)})
            else:
                missing.append(step)
        if missing:
            first = missing[0]
            parts = []
            if first.estep not in ("not started", "-") or first.train_steps or first.checkpoints:
                estep = "" if first.estep == "-" else f"E-step {first.estep}, "
                parts.append(f"iteration {first.iteration} of {iterations} unfinished ({estep}M-step "
                             f"{first.train_steps} step(s) logged, {first.checkpoints} checkpoint(s))")  # fmt: skip
                missing = missing[1:]
            if missing:
                numbers = f"{missing[0].iteration}-{missing[-1].iteration}" if len(missing) > 1 else missing[0].iteration
                parts.append(f"iteration{'s' if len(missing) > 1 else ''} {numbers} of {iterations} not started")
            status.unfinished.append(f"{variant}: {'; '.join(parts)}")
    known = {WARM_START} | {s.folder for s in status.steps}
    for path in sorted(out.glob("iter-*")):
        match = ITERATION.match(path.name)
        if path.is_dir() and path.name not in known and match:
            status.unfinished.append(f"{path.name}: not in this config's plan (variants {variants}, {iterations} "
                                     f"iterations); left from an earlier config?")  # fmt: skip
    absent = [name for name in REPORT_FILES if status.artefacts[name] is None]
    if absent and not status.unfinished:
        status.unfinished.append(f"report: {', '.join(absent)} missing although every iteration is done; rerun the "
                                 f"job on this folder to write it (finished iterations are reused)")  # fmt: skip
    return status


def render(status: RunStatus) -> str:
    """The status as Markdown: plan, iterations, metrics, artefacts, what is left."""
    done = sum(1 for s in status.steps if s.done and s.iteration > 0)
    planned = len(status.variants) * status.iterations
    lines = [
        f"# Run {status.folder}",
        "",
        f"Recipe `{status.recipe}`: warm start, then {status.iterations} EM iteration(s) for each variant "
        f"({', '.join(status.variants)}). Done: {done} of {planned} iterations"
        f"{', warm start done' if status.steps and status.steps[0].done else ', warm start not done'}.",
        "",
        "## Iterations",
        "",
        markdown_table([{"variant": s.variant, "iteration": s.iteration, "done": "yes" if s.done else "no",
                         "E-step": s.estep, "train steps": s.train_steps, "checkpoints": s.checkpoints,
                         "quarantined": s.quarantined} for s in status.steps]),  # fmt: skip
        "## Metrics (held-out test; dev_em decides what is kept)",
        "",
        markdown_table(status.metrics),
        "## Artefacts",
        "",
        markdown_table([{"artefact": name, "state": state or "absent"} for name, state in status.artefacts.items()]),
        "## Unfinished",
        "",
    ]
    if status.unfinished:
        lines.extend(f"- {item}" for item in status.unfinished)
    else:
        lines.append("Nothing: the run is complete.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.status", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a run folder of `python -m pipelines.run` (it holds config.yaml)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON instead of Markdown")
    args = parser.parse_args(argv)
    try:
        status = summarize(args.folder)
    except NotARunFolderError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({**asdict(status), "done": status.done}, indent=2, default=str))
    else:
        print(render(status), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
