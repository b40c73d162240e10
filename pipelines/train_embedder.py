"""Contrastive fine-tuning of the sentence embedder on Ray Train: the retriever's M-step (ToolRet-style training).

The policy trainer (pipelines/train.py) trains causal LMs on token log-probabilities; an embedder is trained on
vectors, so it gets this small trainer of its own, with the same shape: an in-process core (`EmbedderTrainer`, also the
single-process baseline of tests) that Ray Train's `TorchTrainer` runs once per worker over gloo, and a driver
function (`run_embedder_training`) that returns the last checkpoint.

Why the batches are planned in the driver: in-batch negatives are only true negatives when no two rows of a batch
share a tool (pipelines/data/tool_pairs.py `plan_batches`), so every row arrives tagged with its step and slot and
worker r takes the slots r, r + W, ... of each step. The rows of a step are therefore the same whatever the number of
workers, and a checkpoint's data position is just its step number (resume repeats an uninterrupted run). Each worker
computes InfoNCE over its own share (its in-batch negatives are the other rows of that share); DDP averages the
gradients, so every step optimises the mean of the workers' losses.

A checkpoint is a sentence-transformers folder (`SentenceTransformer.save`) plus `trainer_state.pt`: the retriever
loads it as its encoder with `retriever.model_path=<folder>` (actors/models.py `load_embedder`).
"""

from __future__ import annotations

import csv
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.objectives import contrastive

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


@dataclass
class EmbedderSettings:
    """Everything a worker needs, as plain values (sent to Ray Train workers as `train_loop_config`)."""

    base_path: str | None = None
    """The sentence-transformers folder to start from; empty = the packaged all-MiniLM-L6-v2."""
    lr: float = 3e-5
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    temperature: float = 0.05
    """InfoNCE temperature (all-MiniLM-L6-v2 was trained with scale 20, i.e. 0.05)."""
    max_seq_length: int = 128
    freeze_embeddings: bool = False
    """Keep the word-embedding table fixed: half of MiniLM's parameters, and the part most prone to overfit a few
    hundred queries' vocabulary."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    report_every: int = 10
    threads: int = 1
    seed: int = 0

    def check(self, num_workers: int) -> None:
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"recipe.lr_schedule={self.lr_schedule!r} is not constant, linear or cosine")
        if self.temperature <= 0:
            raise ValueError(f"recipe.temperature={self.temperature} must be > 0")
        if num_workers < 1:
            raise ValueError(f"recipe.num_workers={num_workers} must be >= 1")


def steps_of(rows: Sequence[dict]) -> list[list[dict]]:
    """Rows grouped by step, each step in slot order; a gap or a repeated slot is an error naming the step."""
    by_step: dict[int, list[dict]] = {}
    for index, row in enumerate(rows):
        for key in ("step", "slot", "query", "positive", "negatives"):
            if key not in row:
                raise ValueError(f"embedder training row {index}: field {key!r} is missing")
        by_step.setdefault(int(row["step"]), []).append(row)
    if sorted(by_step) != list(range(len(by_step))):
        raise ValueError(f"embedder training rows: steps {sorted(by_step)[:5]}... are not 0..{len(by_step) - 1}")
    steps = []
    for step in range(len(by_step)):
        batch = sorted(by_step[step], key=lambda row: int(row["slot"]))
        if [int(row["slot"]) for row in batch] != list(range(len(batch))):
            raise ValueError(f"embedder training rows: step {step} has slots that are not 0..{len(batch) - 1}")
        if len({len(row["negatives"]) for row in batch}) > 1:
            raise ValueError(f"embedder training rows: step {step} mixes rows with different numbers of negatives")
        steps.append(batch)
    return steps


class PairEncoder(torch.nn.Module):
    """Queries and documents through one shared encoder in a single forward call (what DDP expects per step)."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, queries: dict[str, torch.Tensor], documents: dict[str, torch.Tensor]):
        return self.encoder(queries)["sentence_embedding"], self.encoder(documents)["sentence_embedding"]


def _identity_all_reduce(values: torch.Tensor) -> torch.Tensor:
    return values


class EmbedderTrainer:
    """One worker's share of contrastive training, independent of Ray (tests run it in-process).

    `all_reduce` sums a tensor over workers (identity when alone); `wrap` is DDP under Ray Train.
    """

    def __init__(self, settings: EmbedderSettings, rows: Sequence[dict], rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] = _identity_all_reduce,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None):  # fmt: skip
        from actors.models import load_embedder
        from pipelines.train import _schedule

        self.settings, self.rank, self.world_size, self.all_reduce = settings, rank, world_size, all_reduce
        self.steps = steps_of(rows)
        for step, batch in enumerate(self.steps):
            if len(batch) % world_size:
                raise ValueError(f"step {step} holds {len(batch)} rows, not divisible by {world_size} workers")
        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        self.encoder = load_embedder(settings.base_path, device="cpu", max_seq_length=settings.max_seq_length)
        self.encoder.train()
        for name, parameter in self.encoder.named_parameters():
            # BERT's pooler feeds no sentence embedding (mean pooling): left trainable, DDP would wait for its gradient
            if ".pooler." in name or (settings.freeze_embeddings and ".embeddings." in name):
                parameter.requires_grad_(False)
        self.model = wrap(PairEncoder(self.encoder)) if wrap else PairEncoder(self.encoder)
        trainable = [(n, p) for n, p in self.encoder.named_parameters() if p.requires_grad]
        self.parameters = [p for _, p in trainable]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": settings.weight_decay},
             {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}], lr=settings.lr,
        )  # fmt: skip
        self.total_steps = len(self.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(settings, self.total_steps))
        self.step_index = 0

    def _features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        prepare = getattr(self.encoder, "preprocess", None) or self.encoder.tokenize
        return prepare(texts)

    def step(self) -> dict[str, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        s = self.settings
        mine = self.steps[self.step_index][self.rank :: self.world_size]
        count, negatives = len(mine), len(mine[0]["negatives"])
        documents = [row["positive"] for row in mine] + [text for row in mine for text in row["negatives"]]
        queries, encoded = self.model(self._features([row["query"] for row in mine]), self._features(documents))
        hard = encoded[count:].view(count, negatives, -1) if negatives else None
        loss = contrastive(queries, encoded[:count], hard, s.temperature)
        loss.backward()  # DDP averages the gradients over workers: the mean of the workers' losses
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.parameters, s.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # in-batch accuracy: the positive outscores every other candidate
            candidates = torch.nn.functional.normalize(encoded, dim=-1)
            scores = torch.nn.functional.normalize(queries, dim=-1) @ candidates.T
            correct = float((scores.argmax(-1) == torch.arange(count)).sum())
        self.step_index += 1
        cpu = time.process_time() - cpu_started
        summed = self.all_reduce(torch.tensor([float(loss.detach()) * count, correct, float(count), cpu],
                                              dtype=torch.float64))  # fmt: skip
        return {"step": self.step_index, "time": time.time(), "loss": float(summed[0] / summed[2]),
                "in_batch_accuracy": float(summed[1] / summed[2]), "rows": int(summed[2]), "grad_norm": grad_norm,
                "lr": lr, "seconds": time.perf_counter() - started, "cpu_seconds": float(summed[3])}  # fmt: skip

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """A sentence-transformers folder (the retriever loads it) plus optimizer, scheduler, step and RNG state."""
        folder = Path(folder)
        self.encoder.save(str(folder), create_model_card=False)
        torch.save({"step": self.step_index, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(), "settings": asdict(self.settings)}, folder / STATE_FILE)  # fmt: skip
        return folder

    def load(self, folder: str | os.PathLike) -> None:
        from actors.models import load_embedder

        folder = Path(folder)
        saved = load_embedder(folder, device="cpu", max_seq_length=self.settings.max_seq_length)
        self.encoder.load_state_dict(saved.state_dict())
        state = torch.load(folder / STATE_FILE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        self.step_index = int(state["step"])


# ---- Ray Train ------------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    """What each Ray Train worker runs: build the trainer, restore the last checkpoint if any, step, report."""
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.train import _ray_all_reduce, quiet_report_log, run_worker_steps

    quiet_report_log()
    settings = EmbedderSettings(**config["settings"])
    torch.set_num_threads(max(1, settings.threads))
    context = ray.train.get_context()
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    trainer = EmbedderTrainer(settings, rows, context.get_world_rank(), context.get_world_size(), _ray_all_reduce,
                              wrap=lambda model: ray.train.torch.prepare_model(model, move_to_device=True))
    run_worker_steps(trainer, settings.checkpoint_every, settings.report_every)


@dataclass
class EmbedderTrainResult:
    checkpoint: Path
    """The last checkpoint: a sentence-transformers folder (with trainer_state.pt beside the model files)."""
    metrics_csv: Path
    history: list[dict] = field(default_factory=list)


def run_embedder_training(rows: Sequence[dict], settings: EmbedderSettings, out_dir: str | os.PathLike,
                          num_workers: int = 2, placement: Any = None, max_failures: int = 2,
                          name: str = "embedder") -> EmbedderTrainResult:  # fmt: skip
    """Train on planned rows (pipelines/data/tool_pairs.py `batch_rows`) with Ray Train; a rerun with the same
    `out_dir` and `name` continues from the run's last checkpoint."""
    import pyarrow as pa
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.resources import Placement
    from pipelines.train import _metrics_callback

    settings.check(num_workers)
    for step, batch in enumerate(steps_of(rows)):
        if len(batch) % num_workers:
            raise ValueError(f"step {step} holds {len(batch)} rows, not divisible by recipe.num_workers={num_workers}")
    placement = placement or Placement(num_cpus=0.5, where="trainer")
    out = Path(out_dir).resolve()
    metrics_csv = out / f"{name}_metrics.csv"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": asdict(settings)},
        scaling_config=ray.train.ScalingConfig(**placement.scaling_config(num_workers)),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(out / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[_metrics_callback(metrics_csv)],
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(settings.threads)}},
        ),
        datasets={"train": ray.data.from_arrow(pa.Table.from_pylist(list(rows)))},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"embedder training run {out / 'ray_train' / name} finished without a checkpoint")
    history = []
    if metrics_csv.exists():
        with open(metrics_csv) as handle:
            history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    return EmbedderTrainResult(Path(result.checkpoint.path), metrics_csv, history)


def export_embedder(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The checkpoint's sentence-transformers files alone (no optimizer state): what `retriever.model_path` names."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns(STATE_FILE))
    return folder
