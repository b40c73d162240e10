"""Copy pretraining: the rows it trains on, and that a tiny model trained on them copies what it has never seen."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from pipelines.copy_pretrain import copy_alphabets, copy_pretrain, repeat_rows
from pipelines.data.world import SYLLABLES


def test_each_row_repeats_its_random_start_after_a_gap_of_varying_length():
    alphabets = [list(range(10, 40)), list(range(40, 60))]
    rows = repeat_rows(alphabets, 200, seed=3, min_len=4, max_len=9, max_gap=5)
    gaps = set()
    for index, row in enumerate(rows):
        target, prompt = row["token_ids"], row["prompt_ids"]
        assert 4 <= len(target) <= 9
        assert prompt[: len(target)] == target
        gaps.add(len(prompt) - len(target))
        assert set(prompt) <= set(alphabets[index % 2])  # each row over one alphabet, in turn
    assert gaps == set(range(6))  # the distance to the copy varies: no fixed look-back solves it
    assert repeat_rows(alphabets, 5, seed=3) == repeat_rows(alphabets, 5, seed=3)
    assert repeat_rows(alphabets, 5, seed=3) != repeat_rows(alphabets, 5, seed=4)


def test_bad_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="alphabets"):
        repeat_rows([], 3, seed=0)
    with pytest.raises(ValueError, match="alphabets"):
        repeat_rows([[1, 2], []], 3, seed=0)
    with pytest.raises(ValueError, match="min_len"):
        repeat_rows([[1, 2]], 3, seed=0, min_len=5, max_len=4)


@pytest.fixture(scope="module")
def syllable_tokenizer(small_world):
    """A BPE that keeps the world's name syllables whole and splits digits, as the recipes' built tokenizer does."""
    from actors.config import ModelConfig
    from actors.models import train_bpe_tokenizer

    return train_bpe_tokenizer(small_world.texts(), vocab_size=400, added_tokens=ModelConfig().added_tokens,
                               whole_pieces=SYLLABLES, split_digits=True)


def test_the_alphabets_are_the_name_syllables_and_the_numbers(syllable_tokenizer):
    names, numbers = copy_alphabets(syllable_tokenizer, SYLLABLES)
    pieces = {syllable_tokenizer.decode([i]).strip().lower() for i in names}
    assert pieces <= set(SYLLABLES) and len(pieces) >= 20  # (a syllable the small world never uses has no token)
    assert len(pieces) < len(names) <= 4 * len(pieces)  # lower/capitalised, with/without a space
    assert sorted(syllable_tokenizer.decode([i]) for i in numbers) == list("0123456789")  # digits split
    year = syllable_tokenizer.encode(" 1985", add_special_tokens=False)
    assert [syllable_tokenizer.decode([i]) for i in year if i in numbers] == list("1985")  # every digit is drawn


def test_without_pieces_every_ordinary_token_but_no_special_token_or_protocol_tag(tokenizer):
    for alphabets in (copy_alphabets(tokenizer), copy_alphabets(tokenizer, ["zzqx"])):  # no single-token form
        [vocabulary] = alphabets
        tags = tokenizer.convert_tokens_to_ids(["<search>", "</record>", "<answer>"])
        for excluded in [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, *tags]:
            assert excluded not in vocabulary
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        assert len(vocabulary) == len(tokenizer) - len(special)


def _copy_accuracy(model_dir, alphabets, seed: int = 99) -> float:
    """Greedy next-token accuracy on the repeat of unseen random sequences (its first token is not predictable)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    right = total = 0
    for row in repeat_rows(alphabets, 24, seed=seed):
        ids = torch.tensor([row["prompt_ids"] + row["token_ids"]])
        with torch.no_grad():
            predicted = model(ids).logits[0].argmax(-1)
        start = len(row["prompt_ids"])  # position start predicts token start + 1: the repeat's second token on
        for position in range(start, ids.shape[1] - 1):
            right += int(predicted[position] == ids[0, position + 1])
            total += 1
    return right / total


@pytest.mark.slow
def test_copy_pretraining_on_ray_teaches_a_random_model_to_copy_and_is_not_redone(ray_cluster, syllable_tokenizer,
                                                                                 tmp_path):
    """The default model shape (2 layers, hidden 128) from random init: the repeat of sequences it never saw is
    predicted at chance before, and almost always after (the induction phase change)."""
    from actors.config import ModelConfig
    from actors.models import build_causal_lm

    policy = build_causal_lm(ModelConfig(seed=5), syllable_tokenizer, tmp_path / "policy")
    alphabets = copy_alphabets(syllable_tokenizer, SYLLABLES)
    before = _copy_accuracy(policy, alphabets)
    cfg = OmegaConf.create({
        "seed": 0,
        "model": {"copy_pretrain_steps": 1000, "copy_pretrain_lr": 1e-3},
        "trainer": {"num_workers": 1, "cpus_per_worker": 0.5, "use_gpu": False, "max_failures": 0, "batch_size": 16,
                    "micro_batch_size": 16, "report_every": 100},
    })
    trained = copy_pretrain(policy, cfg, tmp_path / "copy", SYLLABLES)
    after = _copy_accuracy(trained, alphabets)
    assert before < 0.05 and after > 0.8, (before, after)
    result = OmegaConf.load(tmp_path / "copy" / "result.json")
    assert result.steps == 1000 and result.last_loss < result.first_loss / 3
    assert copy_pretrain(policy, cfg, tmp_path / "copy", SYLLABLES) == trained  # done once: a rerun reads result.json
