"""The M-step and every other training job: Ray Train `TorchTrainer` over record folders, one objective registry.

`python -m pipelines.train data.path=<folder of weighted samples | trajectories | preference pairs>
trainer.objective=weighted_nll model.path=<HF folder>` trains and writes a Hugging Face checkpoint.

Why batches are chosen by index rather than streamed in arrival order: each step's *global* batch is a fixed slice of
a seeded permutation of the rows, and worker r takes every W-th row of it. The same rows therefore meet in the same
optimizer step whatever the number of workers, and the data position of a checkpoint is just its step number — so a
resumed run repeats an uninterrupted run's loss curve exactly (verl's resume loses its dataloader state; ours cannot).
Every worker receives the whole Ray Dataset (it is not split); at the sizes one EM iteration produces, that is cheap.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.objectives import OBJECTIVES, PREFERENCE_OBJECTIVES, span_mask, token_logprobs

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


class TrainingDataError(ValueError):
    """A training row that cannot become an example; the message names the row and field."""


@dataclass
class TrainSettings:
    """Everything a worker needs, as plain values (sent to Ray Train workers as `train_loop_config`)."""

    model_path: str
    objective: str = "sft"
    normalize: str = "token"
    lr: float = 2e-3
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 16
    micro_batch_size: int = 8
    epochs: int = 1
    max_steps: int = -1
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 0.0
    """Preference objectives: add alpha x the chosen completions' NLL (per-token mean, averaged over pairs), TRL's
    `rpo_alpha` (Pang et al., 2024). Why: DPO alone can lower the chosen likelihood along with the rejected one. On
    the tiny TTPA policy (beta 0.1, lr 1e-4) alpha 1 kept held-out turn accuracy at 19% where plain DPO fell to 6-10%
    (from 25%); a larger beta did better still (see `TTPARecipeConfig.dpo_beta`)."""
    checkpoint_every: int = 0
    report_every: int = 50
    precision: str = "fp32"
    threads: int = 1
    seed: int = 0
    reference_path: str | None = None
    """Frozen reference for DPO; empty = the starting model."""
    optimizer_from: str | None = None
    """A checkpoint of ours whose AdamW moments this run starts from (its step count, schedule and data position are
    not taken). Why: a fresh AdamW's first updates move every weight by about the learning rate whatever its gradient,
    which undid the ExSearch warm start in a few M-step steps; continuing the warm start's moments does not."""

    @classmethod
    def from_config(cls, trainer_cfg: Any, model_path: str | os.PathLike, **overrides) -> TrainSettings:
        values = {name: getattr(trainer_cfg, name) for name in cls.__dataclass_fields__ if hasattr(trainer_cfg, name)}
        values.update(overrides)
        values["model_path"] = str(model_path)
        return cls(**values)

    def check(self, num_workers: int) -> None:
        if self.objective not in OBJECTIVES or self.objective == "contrastive":
            raise ValueError(f"trainer.objective={self.objective!r} is not one of sft, weighted_nll, dpo, token_dpo")
        if self.batch_size % num_workers:
            raise ValueError(
                f"trainer.batch_size={self.batch_size} must be divisible by trainer.num_workers={num_workers}"
            )
        if self.normalize not in ("token", "weighted_token", "sequence"):
            raise ValueError(f"trainer.normalize={self.normalize!r} is not token, weighted_token or sequence")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"trainer.lr_schedule={self.lr_schedule!r} is not constant, linear or cosine")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision={self.precision!r} is not fp32 or bf16")
        if self.rpo_alpha < 0 or (self.rpo_alpha and self.objective not in PREFERENCE_OBJECTIVES):
            raise ValueError(f"trainer.rpo_alpha={self.rpo_alpha} needs a preference objective (dpo, token_dpo) and "
                             "must be >= 0")


@dataclass
class Example:
    """One sequence: tokens, a mask over targets (position t predicts token t + 1), a weight."""

    input_ids: list[int]
    target_mask: list[int]
    weight: float = 1.0


@dataclass
class PairExample:
    chosen: Example
    rejected: Example


def _ids(row: dict, name: str, index: int) -> list[int]:
    value = row.get(name)
    if value is None:
        raise TrainingDataError(f"training row {index}: field {name!r} is missing")
    return [int(t) for t in value]


def example_from_row(row: dict, index: int, objective: str) -> Example | PairExample:
    """A record (weighted sample, trajectory, or preference pair) as tokens and target masks."""
    prompt = _ids(row, "prompt_ids", index)
    if not prompt:
        raise TrainingDataError(f"training row {index}: field 'prompt_ids' is empty (the first target needs a context)")
    head = [0] * (len(prompt) - 1)
    if objective in PREFERENCE_OBJECTIVES:
        if "chosen_ids" not in row:
            raise TrainingDataError(f"training row {index}: objective {objective!r} needs preference pairs (chosen_ids)")
        chosen, rejected = _ids(row, "chosen_ids", index), _ids(row, "rejected_ids", index)
        if not chosen or not rejected:
            raise TrainingDataError(f"training row {index}: chosen_ids and rejected_ids must be non-empty")
        return PairExample(Example(prompt + chosen, head + [1] * len(chosen)),
                           Example(prompt + rejected, head + [1] * len(rejected)))
    tokens = _ids(row, "token_ids", index)
    mask = [int(m) for m in row.get("loss_mask") or [1] * len(tokens)]
    if len(mask) != len(tokens):
        raise TrainingDataError(
            f"training row {index}: field 'loss_mask' has {len(mask)} entries but 'token_ids' has {len(tokens)}"
        )
    weight = float(row.get("weight", 1.0)) if objective == "weighted_nll" else 1.0
    if not math.isfinite(weight) or weight < 0:
        raise TrainingDataError(f"training row {index}: field 'weight' is {weight}, expected a finite value >= 0")
    return Example(prompt + tokens, head + mask, weight)


def _length(row: Example | PairExample) -> int:
    return len(row.input_ids) if isinstance(row, Example) else len(row.chosen.input_ids) + len(row.rejected.input_ids)


def _pad(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    mask = torch.zeros((len(examples), width - 1), dtype=torch.float32)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        attention[i, : len(e.input_ids)] = 1
        mask[i, : len(e.target_mask)] = torch.tensor(e.target_mask, dtype=torch.float32)
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask, "weights": weights}


def _schedule(settings: TrainSettings, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        if settings.lr_schedule == "constant":
            return 1.0
        progress = (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps)
        if settings.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _identity_all_reduce(values: torch.Tensor) -> torch.Tensor:
    return values


class PolicyTrainer:
    """One worker's share of training, independent of Ray: Ray Train runs it per worker, tests and benchmarks run it
    in-process as the single-process baseline. `all_reduce` sums a tensor over workers (identity when alone)."""

    def __init__(self, settings: TrainSettings, examples: Sequence[Example | PairExample], rank: int = 0,
                 world_size: int = 1, all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity_all_reduce,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):
        from transformers import AutoModelForCausalLM

        self.settings, self.examples = settings, list(examples)
        self.rank, self.world_size, self.all_reduce = rank, world_size, all_reduce
        if len(self.examples) < settings.batch_size:
            raise TrainingDataError(
                f"{len(self.examples)} training rows are fewer than trainer.batch_size={settings.batch_size}"
            )
        torch.manual_seed(settings.seed)
        base = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=torch.float32, local_files_only=True)
        self.pad_id = base.config.pad_token_id if base.config.pad_token_id is not None else 0
        self.base = base
        self.model = wrap(base) if wrap else base
        self.model.train()
        self.reference = None
        if settings.objective in PREFERENCE_OBJECTIVES:
            self.reference = AutoModelForCausalLM.from_pretrained(
                settings.reference_path or settings.model_path, dtype=torch.float32, local_files_only=True
            ).eval()
            self.reference.requires_grad_(False)
        decay = [p for n, p in base.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in base.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
        )
        self.steps_per_epoch = len(self.examples) // settings.batch_size
        total = self.steps_per_epoch * settings.epochs
        self.total_steps = min(total, settings.max_steps) if settings.max_steps > 0 else total
        if settings.optimizer_from:
            self._continue_moments(Path(settings.optimizer_from))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(settings, self.total_steps))
        self.step_index = 0

    def _continue_moments(self, folder: Path) -> None:
        """Start from `folder`'s AdamW moments, with this run's hyperparameters (lr, betas, weight decay)."""
        if not (folder / STATE_FILE).exists():
            raise FileNotFoundError(f"trainer.optimizer_from={folder}: no {STATE_FILE} (not a checkpoint of ours)")
        state = torch.load(folder / STATE_FILE, weights_only=False)["optimizer"]
        for saved, ours in zip(state["param_groups"], self.optimizer.param_groups, strict=False):
            saved.pop("initial_lr", None)  # the scheduler sets it from this run's lr
            saved.update({key: value for key, value in ours.items() if key != "params"})
        try:
            self.optimizer.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"trainer.optimizer_from={folder}: its optimizer does not fit this model ({error})") from None

    # ---- data position ----------------------------------------------------------------------------------------
    def global_batch(self, step: int) -> list[int]:
        """Row indices of step `step`'s global batch: a fixed slice of the epoch's seeded permutation."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.settings.seed, epoch]).permutation(len(self.examples))
        size = self.settings.batch_size
        return order[position * size : (position + 1) * size].tolist()

    def my_rows(self, step: int) -> list[int]:
        return self.global_batch(step)[self.rank :: self.world_size]

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _autocast(self):
        if self.settings.precision == "bf16":
            return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sequence_logps(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logprobs(logits, batch["input_ids"])

    def _micro_loss(self, rows: list[Example | PairExample], denominator: torch.Tensor) -> tuple[torch.Tensor, int]:
        s = self.settings
        if s.objective in PREFERENCE_OBJECTIVES:
            batch = _pad([r.chosen for r in rows] + [r.rejected for r in rows], self.pad_id)
            mask = batch["mask"]
            if s.objective == "token_dpo":
                mask = mask * _differing_span(rows).to(mask.dtype)
            token_logps = self._sequence_logps(self.model, batch)
            logps = (token_logps * mask).sum(-1)
            with torch.no_grad():
                reference = (self._sequence_logps(self.reference, batch) * mask).sum(-1)
            n = len(rows)
            loss = OBJECTIVES[s.objective](logps[:n], logps[n:], reference[:n], reference[n:], s.beta,
                                           s.label_smoothing, denominator)
            if s.rpo_alpha:  # the whole chosen completion, not only its differing span
                loss = loss + s.rpo_alpha * OBJECTIVES["sft"](token_logps[:n], batch["mask"][:n], "sequence", denominator)
            return loss, int(batch["attention_mask"].sum())
        batch = _pad(rows, self.pad_id)
        logps = self._sequence_logps(self.model, batch)
        loss = OBJECTIVES["weighted_nll"](logps, batch["mask"], batch["weights"], s.normalize, denominator)
        return loss, int(batch["attention_mask"].sum())

    def _denominator(self, rows: list[Example | PairExample]) -> torch.Tensor:
        """The global batch's normaliser: masked tokens, sequences or pairs, summed over workers."""
        s = self.settings
        if s.objective in PREFERENCE_OBJECTIVES or s.normalize == "sequence":
            local = float(len(rows))
        elif s.normalize == "weighted_token":
            local = float(sum(r.weight * sum(r.target_mask) for r in rows))
        else:
            local = float(sum(sum(r.target_mask) for r in rows))
        return self.all_reduce(torch.tensor([local], dtype=torch.float64)).float()[0].clamp(min=1.0)

    def step(self) -> dict[str, float]:
        started = time.perf_counter()
        s = self.settings
        rows = [self.examples[i] for i in self.my_rows(self.step_index)]
        # Micro-batches of similar lengths pad less; the loss divides by the global denominator, so order is free.
        rows.sort(key=_length)
        denominator = self._denominator(rows)
        chunks = [rows[i : i + s.micro_batch_size] for i in range(0, len(rows), s.micro_batch_size)]
        total_loss, tokens = 0.0, 0
        for j, chunk in enumerate(chunks):
            last = j == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                loss, n_tokens = self._micro_loss(chunk, denominator)
                # DDP averages gradients over workers; the loss already divides by the global count, so undo that.
                (loss * self.world_size).backward()
            total_loss += float(loss.detach())
            tokens += n_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.base.parameters(), s.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        summed = self.all_reduce(torch.tensor([total_loss, float(tokens)], dtype=torch.float64))
        weights = [self.examples[i].weight for i in self.global_batch(self.step_index - 1)
                   if isinstance(self.examples[i], Example)]
        elapsed = time.perf_counter() - started
        metrics = {
            "step": self.step_index,
            "time": time.time(),
            "epoch": (self.step_index - 1) // self.steps_per_epoch,
            "loss": float(summed[0]),
            "tokens": int(summed[1]),
            "tokens_per_s": float(summed[1]) / elapsed / self.world_size,
            "grad_norm": grad_norm,
            "lr": lr,
        }
        if weights:
            metrics.update(weight_mean=float(np.mean(weights)), weight_max=float(np.max(weights)))
        return metrics

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """A Hugging Face folder (both engines load it) plus optimizer, scheduler, data position and RNG state."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        self.base.save_pretrained(folder)
        AutoTokenizer.from_pretrained(self.settings.model_path, local_files_only=True).save_pretrained(folder)
        torch.save(
            {
                "step": self.step_index,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "settings": asdict(self.settings),
            },
            folder / STATE_FILE,
        )
        return folder

    def load(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = {}
        for path in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(path)))
        missing, unexpected = self.base.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m or not self.base.config.tie_word_embeddings]:
            raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")
        saved = torch.load(folder / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        self.step_index = int(saved["step"])


def _differing_span(rows: list[PairExample]) -> torch.Tensor:
    """Target mask (chosen rows, then rejected rows) keeping only the tokens where chosen and rejected differ: after
    their shared prefix and before their shared ending (each side keeps at least one token where it has one).

    Why not the shared ending too: a branch's greedy completion mostly closes the call like the gold does (`"}}` and
    `</calls>`); those tokens say nothing about which choice was right, yet would be pushed down on the rejected side.
    (On the tiny TTPA policy at beta 0.1 this alone did not stop the format from breaking: `dpo_beta` did.)"""
    width = max(len(e.input_ids) for r in rows for e in (r.chosen, r.rejected)) - 1
    starts, chosen_ends, rejected_ends = [], [], []
    for r in rows:
        prompt = r.chosen.target_mask.index(1) + 1 if 1 in r.chosen.target_mask else len(r.chosen.input_ids)
        a, b = r.chosen.input_ids[prompt:], r.rejected.input_ids[prompt:]
        shorter = min(len(a), len(b))
        shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), shorter)
        tail = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y), shorter)
        tail = max(0, min(tail, shorter - shared - 1))
        starts.append(prompt + shared)
        chosen_ends.append(prompt + len(a) - tail)
        rejected_ends.append(prompt + len(b) - tail)
    return span_mask(width, torch.tensor(starts * 2), torch.tensor(chosen_ends + rejected_ends))


# ---- Ray Train ------------------------------------------------------------------------------------------------


def _ray_all_reduce(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def quiet_report_log() -> None:
    """Ray Train logs every report in full at INFO from the worker; ours carry a bundle of per-step metrics, which made
    each report a screen-wide line in the job's log. Progress stays visible through the controller and metrics.csv."""
    try:  # a private module: if a Ray release moves it, the only loss is a noisier log
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_worker_steps(trainer, checkpoint_every: int, report_every: int) -> None:
    """One Ray Train worker's part, whatever it trains (`PolicyTrainer`, `EmbedderTrainer`): restore the last
    checkpoint if any, step to the end, report in bundles, and checkpoint every `checkpoint_every` steps and at the end
    (rank 0 writes it; every rank reports, as Ray Train requires)."""
    import ray
    import ray.train

    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(folder)
    history: list[dict] = []
    while trainer.step_index < trainer.total_steps:
        history.append(trainer.step())
        step = trainer.step_index
        save = step == trainer.total_steps or (checkpoint_every and step % checkpoint_every == 0)
        # A report costs a round trip to the controller (up to its ~2 s poll), so steps are reported in bundles.
        if not save and step % max(1, report_every):
            continue
        metrics = {**history[-1], "history": history, "node_id": ray.get_runtime_context().get_node_id()}
        history = []
        if save:
            with tempfile.TemporaryDirectory() as folder:
                if context.get_world_rank() == 0:
                    trainer.save(folder)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
                else:
                    ray.train.report(metrics, checkpoint=None)
        else:
            ray.train.report(metrics)


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs: build the trainer, restore the last checkpoint if any, step, report."""
    import ray
    import ray.train
    import ray.train.torch

    quiet_report_log()
    settings = TrainSettings(**config["settings"])
    torch.set_num_threads(max(1, settings.threads))
    context = ray.train.get_context()
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    rows.sort(key=lambda row: int(row["__row"]))  # arrival order is not guaranteed; the index is
    examples = [example_from_row(row, int(row["__row"]), settings.objective) for row in rows]
    trainer = PolicyTrainer(
        settings, examples, context.get_world_rank(), context.get_world_size(), _ray_all_reduce,
        wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=True),
    )
    run_worker_steps(trainer, settings.checkpoint_every, settings.report_every)


def _metrics_callback(path: Path):
    import ray.train

    class WriteMetrics(ray.train.UserCallback):
        """Rank 0's metrics appended to a CSV on the driver's side (the controller), as they arrive."""

        def after_report(self, run_context, metrics, checkpoint):
            rows = metrics[0].get("history", [])
            if not rows:
                return
            last = rows[-1]  # one progress line per report (Ray's own report log is silenced: quiet_report_log)
            shown = [f"{key} {last[key]:{form}}" for key, form in (("step", ".0f"), ("loss", ".4f"), ("lr", ".2e"),
                                                                    ("tokens_per_s", ".0f")) if key in last]
            print(f"[train {path.stem}] " + " ".join(shown), flush=True)
            nodes = len({m.get("node_id") for m in metrics})  # how many nodes the worker group spans
            rows = [{**row, "nodes": nodes} for row in rows]
            columns = list(dict.fromkeys(key for row in rows for key in row))
            new = not path.exists()
            with open(path, "a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                if new:
                    writer.writeheader()
                writer.writerows(rows)

    return WriteMetrics()


@dataclass
class TrainResult:
    checkpoint: Path
    metrics: dict[str, Any]
    metrics_csv: Path
    history: list[dict] = field(default_factory=list)


def run_training(
    rows: Sequence[dict] | Any,
    settings: TrainSettings,
    out_dir: str | os.PathLike,
    num_workers: int = 1,
    cpus_per_worker: float = 0.5,
    use_gpu: bool = False,
    max_failures: int = 2,
    resume: bool = False,
    name: str = "train",
    placement_strategy: str = "PACK",
    placement: Any = None,
) -> TrainResult:
    """Train on `rows` (dicts, a pyarrow Table or a Ray Dataset) with Ray Train; return the final checkpoint folder.

    The run lives in `out_dir/<name>`: rerunning with `resume=True` continues from its last checkpoint; without it,
    an existing run is an error rather than silently overwritten. A `cluster.resources.Placement` (from
    `Placement.of_trainer(cfg.trainer)`) replaces cpus_per_worker / use_gpu / placement_strategy with the whole config.
    """
    import pyarrow as pa
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    settings.check(num_workers)
    out = Path(out_dir).resolve()
    storage = out / "ray_train"
    run_folder = storage / name
    if run_folder.exists() and not resume:
        raise FileExistsError(f"{run_folder} holds an earlier run: pass trainer.resume=true or another output folder")
    if isinstance(rows, ray.data.Dataset):
        table = pa.concat_tables(ray.get(rows.to_arrow_refs()))
    else:
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    # A stable row index, so every worker orders the rows the same way whatever order they arrive in.
    table = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    for index, row in enumerate(table.slice(0, 64).to_pylist()):
        example_from_row(row, index, settings.objective)  # fail in the driver, naming the row, not in N workers
    dataset = ray.data.from_arrow(table)
    metrics_csv = out / f"{name}_metrics.csv"
    if not resume and metrics_csv.exists():
        metrics_csv.unlink()
    env = {"OMP_NUM_THREADS": str(settings.threads)}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": asdict(settings)},
        scaling_config=ray.train.ScalingConfig(**(placement.scaling_config(num_workers) if placement else dict(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker},
            placement_strategy=placement_strategy,
        ))),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_callback(metrics_csv)],
            worker_runtime_env={"env_vars": env},
        ),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_folder} finished without a checkpoint")
    history = []
    if metrics_csv.exists():
        with open(metrics_csv) as handle:
            history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    final = {k: v for k, v in (result.metrics or {}).items() if k not in ("history", "node_id")}
    return TrainResult(Path(result.checkpoint.path), final, metrics_csv, history)


def read_training_rows(folder: str | os.PathLike):
    """A record folder of weighted samples, trajectories or preference pairs, validated, as a Ray Dataset."""
    import ray.data

    from pipelines import records

    manifest = records.read_manifest(folder)
    kind = manifest["kind"]
    if kind not in ("weighted_sample", "trajectory", "preference_pair"):
        raise records.RecordError(f"{folder}: holds {kind!r} records, which are not training samples")
    return ray.data.from_arrow(records.read_records(folder, kind)), kind


def main_entry(cfg) -> TrainResult:
    from cluster.resources import Placement
    from pipelines.jobs import start_job
    from pipelines.report import plot_curves

    if not cfg.data.path:
        raise ValueError("data.path must name a folder of training samples (weighted_sample / preference_pair)")
    if not cfg.model.path:
        raise ValueError("model.path must name the Hugging Face folder to start training from")
    out, _ = start_job(cfg)
    dataset, kind = read_training_rows(cfg.data.path)
    settings = TrainSettings.from_config(cfg.trainer, cfg.model.path)
    print(f"Training {settings.objective} on {dataset.count()} {kind} rows from {cfg.data.path}", flush=True)
    result = run_training(
        dataset, settings, out, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker, cfg.trainer.use_gpu,
        cfg.trainer.max_failures, cfg.trainer.resume, placement=Placement.of_trainer(cfg.trainer),
    )
    if result.history:
        plot_curves(result.history, "step", ["loss"], out / "train_loss.png", title=f"{settings.objective} loss")
    summary = {"checkpoint": str(result.checkpoint), **{k: v for k, v in result.metrics.items()}}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"Checkpoint: {result.checkpoint}\nMetrics: {result.metrics_csv}", flush=True)
    return result


def _hydra_main():
    import hydra

    from pipelines import config as _config  # noqa: F401  (registers the schema)

    @hydra.main(version_base=None, config_path="../conf", config_name="config")
    def main(cfg) -> None:
        main_entry(cfg)

    main()


if __name__ == "__main__":
    _hydra_main()
