"""Ray Train: the same parameters as a single-process loop, worker-count invariance, fault tolerance, exact resume."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipelines.train import (
    PolicyTrainer,
    TrainingDataError,
    TrainSettings,
    example_from_row,
    run_training,
)


def _rows(n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        tokens = [rng.randrange(10, 300) for _ in range(rng.randrange(3, 12))]
        rows.append({"example_id": f"q-{i}", "target": "policy", "sample_index": 0, "prompt_ids": [rng.randrange(10, 300) for _ in range(5)],
                     "token_ids": tokens, "loss_mask": [int(rng.random() < 0.8) for _ in tokens],
                     "log_likelihood": -1.0, "weight": rng.random(), "answer": None, "correct": False,
                     "valid": True})
    return rows


ROWS = _rows()


def _settings(model_path, **overrides) -> TrainSettings:
    values = dict(model_path=str(model_path), objective="weighted_nll", batch_size=8, micro_batch_size=2, epochs=3,
                  lr=1e-3, checkpoint_every=4, report_every=2, seed=3)
    values.update(overrides)
    return TrainSettings(**values)


def _params(folder):
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(history: list[dict]) -> dict[int, float]:
    return {int(row["step"]): row["loss"] for row in history}  # the last value written for a step wins


@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, tiny_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    return run_training(ROWS, _settings(tiny_policy), out, num_workers=1, name="one")


def test_rows_become_examples_or_errors_that_name_them():
    example = example_from_row({"prompt_ids": [1, 2, 3], "token_ids": [4, 5], "loss_mask": [1, 0], "weight": 0.5},
                               0, "weighted_nll")
    assert example.input_ids == [1, 2, 3, 4, 5] and example.target_mask == [0, 0, 1, 0] and example.weight == 0.5
    assert example_from_row({"prompt_ids": [1], "token_ids": [4], "weight": 0.5}, 0, "sft").weight == 1.0
    with pytest.raises(TrainingDataError, match="row 7: field 'loss_mask' has 1 entries but 'token_ids' has 2"):
        example_from_row({"prompt_ids": [1], "token_ids": [4, 5], "loss_mask": [1]}, 7, "sft")
    with pytest.raises(TrainingDataError, match="row 2: field 'weight' is nan"):
        example_from_row({"prompt_ids": [1], "token_ids": [4], "weight": float("nan")}, 2, "weighted_nll")
    with pytest.raises(TrainingDataError, match="row 0: objective 'dpo' needs preference pairs"):
        example_from_row({"prompt_ids": [1], "token_ids": [4]}, 0, "dpo")
    with pytest.raises(ValueError, match="trainer.batch_size=9 must be divisible by trainer.num_workers=2"):
        TrainSettings(model_path="x", batch_size=9).check(2)


def test_ray_train_matches_a_single_process_loop(one_worker_run, tiny_policy):
    local = PolicyTrainer(_settings(tiny_policy), [example_from_row(r, i, "weighted_nll") for i, r in enumerate(ROWS)])
    curve = [local.step()["loss"] for _ in range(local.total_steps)]
    assert local.total_steps == 24 and len(one_worker_run.history) == 24
    assert [row["loss"] for row in one_worker_run.history] == pytest.approx(curve, abs=1e-6)
    assert _max_difference(_params(one_worker_run.checkpoint), local.base.state_dict()) < 1e-6
    assert curve[-1] < curve[0]  # it learns
    assert one_worker_run.metrics_csv.read_text().startswith("step,time,epoch,loss,tokens")


def test_two_workers_equal_one_worker_with_the_same_global_batch(one_worker_run, tiny_policy, tmp_path):
    two = run_training(ROWS, _settings(tiny_policy), tmp_path, num_workers=2, name="two")
    assert [r["loss"] for r in two.history] == pytest.approx([r["loss"] for r in one_worker_run.history], abs=1e-5)
    assert _max_difference(_params(two.checkpoint), _params(one_worker_run.checkpoint)) < 5e-4
    assert two.history[0]["tokens"] == one_worker_run.history[0]["tokens"]


def _kill_actors(cluster, class_name: str) -> int:
    """SIGKILL the processes of the live actors of a class, found through Ray's state API (the dashboard)."""
    import os
    import signal

    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    actors = list_actors(address=cluster.dashboard_url, filters=filters)
    for actor in actors:
        os.kill(actor.pid, signal.SIGKILL)
    return len(actors)


def _run_in_background(**kwargs):
    box: dict = {}

    def target():
        try:
            box["result"] = run_training(**kwargs)
        except Exception as error:  # noqa: BLE001  (the test inspects it)
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_for_step(csv_path, step: int, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if csv_path.exists():
            lines = csv_path.read_text().strip().splitlines()[1:]
            if lines and int(lines[-1].split(",")[0]) >= step:
                return
        time.sleep(0.1)
    raise AssertionError(f"training never reached step {step}")


def test_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, one_worker_run, tiny_policy, tmp_path):
    thread, box = _run_in_background(rows=ROWS, settings=_settings(tiny_policy), out_dir=tmp_path, num_workers=1,
                                     max_failures=2, name="killed")
    _wait_for_step(tmp_path / "killed_metrics.csv", 6)
    assert _kill_actors(ray_cluster, "RayTrainWorker") == 1, "one training worker is alive mid-run"
    thread.join(timeout=300)
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert _losses(result.history) == pytest.approx(_losses(one_worker_run.history), abs=1e-6)
    assert _max_difference(_params(result.checkpoint), _params(one_worker_run.checkpoint)) < 1e-6
    steps = [int(r["step"]) for r in result.history]
    assert len(steps) > len(set(steps))  # steps after the last checkpoint were run twice


def test_resume_after_a_stop_continues_the_same_curve(ray_cluster, one_worker_run, tiny_policy, tmp_path):
    thread, box = _run_in_background(rows=ROWS, settings=_settings(tiny_policy), out_dir=tmp_path, num_workers=1,
                                     max_failures=0, name="stopped")
    _wait_for_step(tmp_path / "stopped_metrics.csv", 10)
    assert _kill_actors(ray_cluster, "TrainController") >= 1  # the controller dies (earlier runs leave theirs alive)
    thread.join(timeout=120)
    assert "error" in box
    with pytest.raises(FileExistsError, match="pass trainer.resume=true"):
        run_training(ROWS, _settings(tiny_policy), tmp_path, num_workers=1, name="stopped")
    resumed = run_training(ROWS, _settings(tiny_policy), tmp_path, num_workers=1, name="stopped", resume=True)
    assert _losses(resumed.history) == pytest.approx(_losses(one_worker_run.history), abs=1e-6)
    assert _max_difference(_params(resumed.checkpoint), _params(one_worker_run.checkpoint)) < 1e-6


def test_weighted_token_normalisation_rescales_the_step_by_the_batchs_weighted_tokens(tiny_policy):
    """Same rows and model: the weighted_token loss is the token loss x (tokens / sum of weight x tokens) of the global
    batch, and scaling every weight leaves it unchanged (the weights set shares, not the step's size)."""
    examples = [example_from_row(r, i, "weighted_nll") for i, r in enumerate(ROWS)]
    halved = [example_from_row({**r, "weight": r["weight"] / 2}, i, "weighted_nll") for i, r in enumerate(ROWS)]
    by_token = PolicyTrainer(_settings(tiny_policy), examples)
    rows = [examples[i] for i in by_token.global_batch(0)]
    tokens = sum(sum(e.target_mask) for e in rows)
    weighted = sum(e.weight * sum(e.target_mask) for e in rows)
    loss = by_token.step()["loss"]
    self_normalised = PolicyTrainer(_settings(tiny_policy, normalize="weighted_token"), examples).step()["loss"]
    assert self_normalised == pytest.approx(loss * tokens / weighted, rel=1e-5)
    assert PolicyTrainer(_settings(tiny_policy, normalize="weighted_token"), halved).step()["loss"] == pytest.approx(
        self_normalised, rel=1e-5)
    with pytest.raises(ValueError, match="trainer.normalize='tokens'"):
        _settings(tiny_policy, normalize="tokens").check(1)


def test_token_dpo_widens_the_margin_on_the_differing_span(tiny_policy):
    prompt = [5, 6, 7, 8]
    pairs = [{"prompt_ids": prompt, "chosen_ids": [20, 21, 22 + i], "rejected_ids": [20, 21, 40 + i],
              "prefix_length": 2} for i in range(8)]
    settings = TrainSettings(model_path=str(tiny_policy), objective="token_dpo", batch_size=8, micro_batch_size=4,
                             epochs=20, lr=5e-3, beta=0.5, lr_schedule="constant")
    trainer = PolicyTrainer(settings, [example_from_row(p, i, "token_dpo") for i, p in enumerate(pairs)])
    losses = [trainer.step()["loss"] for _ in range(trainer.total_steps)]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the start: -log sigmoid(0)
    assert losses[-1] < 0.3



def test_token_dpo_scores_only_the_span_where_chosen_and_rejected_differ():
    """Neither the shared prefix nor the shared ending (the call's closing tokens) is scored on either side."""
    from pipelines.train import _differing_span

    pair = {"prompt_ids": [5, 6, 7], "chosen_ids": [20, 21, 22, 30, 31], "rejected_ids": [20, 21, 40, 41, 30, 31],
            "prefix_length": 2}
    mask = _differing_span([example_from_row(pair, 0, "token_dpo")])
    assert mask.tolist() == [[0, 0, 0, 0, 1, 0, 0, 0],   # chosen: token 5 (22) alone
                             [0, 0, 0, 0, 1, 1, 0, 0]]   # rejected: tokens 5 and 6 (40, 41)
    longer = {**pair, "chosen_ids": [20, 21], "rejected_ids": [20, 21, 9]}  # rejected adds a token at the end
    assert _differing_span([example_from_row(longer, 0, "token_dpo")]).tolist() == [[0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]


def test_rpo_alpha_adds_the_chosen_completions_mean_nll_to_the_first_dpo_step(tiny_policy):
    """At step 0 the policy is its reference, so DPO's loss is log 2 and the rpo term is alpha x the chosen
    completions' per-token NLL averaged over pairs, over the whole completion (the shared prefix too)."""
    import torch
    from transformers import AutoModelForCausalLM

    pairs = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [20, 21, 22 + i], "rejected_ids": [20, 21, 40 + i],
              "prefix_length": 2} for i in range(4)]
    examples = [example_from_row(p, i, "token_dpo") for i, p in enumerate(pairs)]
    settings = TrainSettings(model_path=str(tiny_policy), objective="token_dpo", batch_size=4, micro_batch_size=4,
                             rpo_alpha=0.5)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_policy), dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor([p["prompt_ids"] + p["chosen_ids"] for p in pairs])
        logps = torch.log_softmax(model(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    nll = float(-logps[:, 3:].mean())  # targets 4..6: the 3 chosen tokens of every pair
    assert PolicyTrainer(settings, examples).step()["loss"] == pytest.approx(0.6931 + 0.5 * nll, rel=1e-4)
    with pytest.raises(ValueError, match="rpo_alpha"):
        TrainSettings(model_path=str(tiny_policy), objective="sft", rpo_alpha=1.0).check(1)

def test_a_run_can_continue_another_runs_adam_moments(one_worker_run, tmp_path):
    """The M-step's `optimizer_from`: the saved moments, this run's lr, and a first step smaller than a fresh AdamW's
    (which moves every weight with a gradient by the full lr)."""
    start = one_worker_run.checkpoint
    examples = [example_from_row(r, i, "weighted_nll") for i, r in enumerate(ROWS)]
    fresh = PolicyTrainer(_settings(start, lr=3e-4, lr_schedule="constant"), examples)
    carried = PolicyTrainer(_settings(start, lr=3e-4, lr_schedule="constant", weight_decay=0.01,
                                      optimizer_from=str(start)), examples)
    saved = torch.load(start / "trainer_state.pt", weights_only=False)["optimizer"]["state"]
    assert torch.equal(carried.optimizer.state_dict()["state"][0]["exp_avg_sq"], saved[0]["exp_avg_sq"])
    assert [g["lr"] for g in carried.optimizer.param_groups] == [3e-4, 3e-4]
    assert [g["weight_decay"] for g in carried.optimizer.param_groups] == [0.01, 0.0]  # this run's, not the saved 0.0
    moves = {}
    for name, trainer in (("fresh", fresh), ("carried", carried)):
        before = [p.detach().clone() for p in trainer.base.parameters()]
        trainer.step()
        moves[name] = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(trainer.base.parameters(), before, strict=True)])
    assert moves["fresh"].max() == pytest.approx(3e-4, rel=1e-3)
    assert moves["carried"].mean() < 0.5 * moves["fresh"].mean()
    with pytest.raises(FileNotFoundError, match=f"trainer.optimizer_from={tmp_path}: no trainer_state.pt"):
        PolicyTrainer(_settings(start, optimizer_from=str(tmp_path)), examples)


def test_checkpoint_is_an_engine_loadable_hf_folder(one_worker_run):
    import asyncio

    from actors.config import EngineConfig
    from actors.llm import LLMEngineCore, Sampling

    engine = LLMEngineCore(one_worker_run.checkpoint, EngineConfig(max_model_len=512))
    out = asyncio.run(engine.generate([[5, 6, 7]], Sampling(temperature=0, max_tokens=4)))
    assert len(out[0].completions[0].token_ids) >= 1
    assert (one_worker_run.checkpoint / "trainer_state.pt").is_file()
    assert torch.load(one_worker_run.checkpoint / "trainer_state.pt", weights_only=False)["step"] == 24


def test_train_job_from_a_record_folder(ray_cluster, tiny_policy, tmp_path):
    """`python -m pipelines.train` as composed by Hydra: validated records in, checkpoint + CSV + PNG out."""
    from hydra import compose, initialize_config_dir

    import pipelines.config  # noqa: F401
    from pipelines import records
    from pipelines.train import main_entry
    from tests.conftest import REPO

    samples = records.write_records(ROWS, tmp_path / "samples", "weighted_sample")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"data.path={samples}", f"model.path={tiny_policy}", "trainer.objective=weighted_nll",
            "trainer.batch_size=16", "trainer.micro_batch_size=8", f"output_dir={tmp_path / 'job'}",
        ])
    result = main_entry(cfg)
    summary = json.loads((tmp_path / "job" / "train_summary.json").read_text())
    assert summary["step"] == 4 and Path(summary["checkpoint"]) == result.checkpoint
    assert (tmp_path / "job" / "train_loss.png").stat().st_size > 1000
    bad = dict(ROWS[0], loss_mask=[1])
    records_dir = tmp_path / "bad"
    records_dir.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    loose = pa.schema([f.with_nullable(True) for f in records.WEIGHTED_SAMPLE])
    pq.write_table(pa.Table.from_pylist([ROWS[1], bad], schema=loose), records_dir / "part-00000.parquet")
    records.write_manifest(records_dir, "weighted_sample", 2)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"data.path={records_dir}", f"model.path={tiny_policy}", f"output_dir={tmp_path / 'bad_job'}"])
    with pytest.raises(records.RecordError, match=r"weighted_sample row 1 .*loss_mask has 1 entries"):
        main_entry(cfg)
