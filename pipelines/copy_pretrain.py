"""Copy pretraining: a tiny policy built here learns to copy before it learns any task.

Why: every recipe's tiny policy must copy names and numbers it has never seen (a topic's name from the question into
a search, a bridge entity from a passage into a record, a value from a tool result into a call). A pretrained LM does
that with induction heads (attend to an earlier occurrence of the current token, copy what followed it). A randomly
initialised 2-layer model trained on the recipes' demonstrations forms them late and at random: measured in-process,
the ExSearch warm start scored 0.7-1.3% held-out EM after 750 steps, and 7-31% after 1,500 depending on the seed.
Trained first on random token sequences repeated at a random distance, where the repeat can be predicted only by
copying, the same model shows the induction phase change after ~500-800 steps (loss 6.4 -> 0.3 in 1,000; a fixed
distance would be learnt as a positional shortcut instead). With name syllables only it then reached 27-31% after
500 warm-start steps; with syllables and digits, and digits split by the tokenizer (`model.split_digits`), 48% at
step 500 and 59% at step 750 of a 1,000-step warm start (300 held-out questions; 59% for a second seed at 750).

A model given by `model.path` is never copy-pretrained: it was pretrained for real.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from pipelines.recipes.iterations import finished_result, write_result


def copy_alphabets(tokenizer, pieces: Iterable[str] = ()) -> list[list[int]]:
    """The token groups copy sequences draw from (each sequence from one group, groups equally often).

    With `pieces` (the world's name syllables, which the built BPE keeps whole): their single-token forms (lower and
    capitalised, with and without a leading space), and the number tokens (the ten digits when the tokenizer splits
    digits, as the built one does by default). Names and numbers are what the recipes
    copy: a bridge entity from a passage, a year or a population into a record and an answer, a value into a tool
    call. Without pieces (or when none is a single token): one group, every ordinary token. Special tokens and the
    added protocol tags are never drawn.

    Measured (tiny Llama, lr 1e-3, batch 16): on the ~80 syllable tokens alone the phase change came at ~600-700 steps
    and the ExSearch warm start reached 27-31% held-out EM in 500 steps, but 2% of the questions whose answer is a
    number (a third of them: " 1985" is " 198" + "5", which the model cut to "198"); on all ~1,000 ordinary tokens the
    phase change came at ~900 steps and the same warm start reached 13% (one seed). Adding the digits fixes numbers
    only once a number is the same tokens wherever it stands (`model.split_digits`).
    """
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ordinary = [i for i in range(len(tokenizer)) if i not in excluded]
    forms = {form for piece in pieces for word in (piece.lower(), piece.capitalize()) for form in (word, " " + word)}
    names = {ids[0] for ids in (tokenizer.encode(form, add_special_tokens=False) for form in forms) if len(ids) == 1}
    names -= excluded
    numbers = [i for i in ordinary if tokenizer.decode([i]).strip().isdigit()]
    if not names:
        return [ordinary]
    return [sorted(names), numbers] if numbers else [sorted(names)]


def repeat_rows(alphabets: Sequence[Sequence[int]], rows: int, seed: int, min_len: int = 8, max_len: int = 32,
                max_gap: int = 16) -> list[dict]:
    """Training rows `prompt = a + b`, `target = a`: a random sequence `a`, random filler `b`, then `a` again, each
    row over one of `alphabets` (in turn).

    The filler's length varies so the distance to the copy varies: only a content-based lookup (an induction head)
    predicts the repeat, not a head that looks back a fixed number of positions.
    """
    if not alphabets or not all(alphabets):
        raise ValueError("copy pretraining needs non-empty token alphabets")
    if not 1 <= min_len <= max_len or max_gap < 0:
        raise ValueError(f"copy sequences: need 1 <= min_len ({min_len}) <= max_len ({max_len}) and max_gap >= 0")
    rng = random.Random(seed)
    out = []
    for index in range(rows):
        alphabet = alphabets[index % len(alphabets)]
        first = [rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len))]
        filler = [rng.choice(alphabet) for _ in range(rng.randint(0, max_gap))]
        out.append({"prompt_ids": first + filler, "token_ids": first, "weight": 1.0})
    return out


def copy_pretrain(policy: Path, cfg: DictConfig, out: Path, pieces: Iterable[str] = ()) -> Path:
    """`policy` after `model.copy_pretrain_steps` steps of copy sequences over `pieces` (see `copy_alphabets`) on
    Ray Train; skipped when `out` holds a finished run."""
    from transformers import AutoTokenizer

    from cluster.resources import Placement
    from pipelines.train import TrainSettings, run_training

    done = finished_result(out)
    if done is not None:
        return Path(done["checkpoint"])
    steps = cfg.model.copy_pretrain_steps
    tokenizer = AutoTokenizer.from_pretrained(policy, local_files_only=True)
    settings = TrainSettings.from_config(cfg.trainer, policy, objective="sft", lr=cfg.model.copy_pretrain_lr,
                                         epochs=1, max_steps=steps, lr_schedule="constant", seed=cfg.seed)
    rows = repeat_rows(copy_alphabets(tokenizer, pieces), steps * settings.batch_size, cfg.seed)
    print(f"[prepare] copy pretraining: {steps} steps of repeated random sequences", flush=True)
    trained = run_training(rows, settings, out, cfg.trainer.num_workers, cfg.trainer.cpus_per_worker,
                           cfg.trainer.use_gpu, cfg.trainer.max_failures, resume=True, name="copy",
                           placement=Placement.of_trainer(cfg.trainer))
    losses = [row["loss"] for row in trained.history if "loss" in row]
    write_result(out, {"checkpoint": str(trained.checkpoint), "steps": steps,
                       "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None})
    return trained.checkpoint
