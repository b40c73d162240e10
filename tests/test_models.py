"""Model factory: tiny causal LMs built here load back and generate; the packaged embedder works offline."""

from __future__ import annotations

import pytest
import torch

from actors.config import ModelConfig
from actors.models import (
    build_causal_lm,
    check_model_dir,
    ensure_policy,
    load_causal_lm,
    load_embedder,
    minilm_tokenizer,
    train_bpe_tokenizer,
)

CORPUS = [
    "Mira Tovenka was born in Kalovren in 1954.",
    "Dravel Systems was founded by Mira Tovenka in 1987.",
    "Kalovren is a city in Sarelia.",
    "Where was the founder of Dravel Systems born?",
] * 40


@pytest.fixture(scope="module")
def bpe():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, max_token_chars=4)


def test_bpe_pieces_are_short_and_cover_unseen_names(bpe):
    vocab = bpe.get_vocab()
    learned = [piece for piece, index in vocab.items() if index >= len(bpe.all_special_ids) + 256]
    assert learned and max(len(piece.lstrip("Ġ")) for piece in learned) <= 4
    unseen = "Tovmira Kalsys"  # a new name from seen syllables
    ids = bpe(unseen, add_special_tokens=False)["input_ids"]
    assert bpe.unk_token_id not in ids
    assert bpe.decode(ids) == unseen  # byte-level: exact round trip


def _boundaries(tokenizer, text: str) -> set[int]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return {end for _, end in encoded["offset_mapping"]}


def test_whole_pieces_are_never_merged_across():
    from pipelines.data.world import SYLLABLES, WorldConfig, build_world

    world = build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                    train_questions=30, dev_questions=10, test_questions=10))
    plain = train_bpe_tokenizer(world.texts(), vocab_size=1024, max_token_chars=4)
    whole = train_bpe_tokenizer(world.texts(), vocab_size=1024, max_token_chars=4, whole_pieces=SYLLABLES)
    # unseen names built from the world's syllables, and where each syllable ends
    text = "Who founded Lofa Sathal? Venkel Tormi was born in Kazo."
    syllable_ends = {12 + 2, 12 + 4, 17 + 2, 17 + 6, 25 + 3, 25 + 6, 32 + 3, 32 + 5, 50 + 2, 50 + 4}
    assert syllable_ends <= _boundaries(whole, text)  # every syllable ends at a token boundary: no merge crosses
    assert not syllable_ends <= _boundaries(plain, text)  # ordinary BPE merges across them ("L" + "ofa")
    ids = whole(text, add_special_tokens=False)["input_ids"]
    assert whole.decode(ids) == text  # still an exact byte-level round trip
    assert [whole.decode([i]) for i in whole(" Sathal", add_special_tokens=False)["input_ids"]] == [" Sa", "thal"]



def test_split_digits_makes_a_number_the_same_tokens_after_a_space_and_after_a_tag():
    from pipelines.data.world import SYLLABLES, WorldConfig, build_world

    world = build_world(WorldConfig(people_per_split=20, companies_per_split=10, cities_per_split=8,
                                    train_questions=30, dev_questions=10, test_questions=10))
    texts = list(world.texts())
    plain = train_bpe_tokenizer(texts, vocab_size=1024, max_token_chars=4, whole_pieces=SYLLABLES,
                                added_tokens=["<answer>"])
    split = train_bpe_tokenizer(texts, vocab_size=1024, max_token_chars=4, whole_pieces=SYLLABLES,
                                added_tokens=["<answer>"], split_digits=True)

    def number_tokens(tokenizer, text):
        return [t for t in tokenizer.tokenize(text) if t.strip("Ġ").isdigit()]

    passage, answer = "Kazo was founded in 1985.", "<answer>1985"
    assert number_tokens(split, passage) == number_tokens(split, answer) == ["1", "9", "8", "5"]
    assert number_tokens(plain, passage) != number_tokens(plain, answer)  # merges differ after a space: no copy
    for text in (passage, "410,513 metres, 2.5 km", "Who founded Lofa Sathal?"):
        assert split.decode(split(text, add_special_tokens=False)["input_ids"]) == text  # exact round trip
    assert [split.decode([i]) for i in split(" Sathal", add_special_tokens=False)["input_ids"]] == [" Sa", "thal"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_built_model_loads_and_generates_greedily(tmp_path, bpe, family):
    cfg = ModelConfig(family=family, hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, seed=3)
    folder = build_causal_lm(cfg, bpe, tmp_path / family)
    model, tokenizer = load_causal_lm(folder)
    assert model.config.model_type == family and model.config.vocab_size == len(tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer(["Mira was", "Where was the founder"], return_tensors="pt", padding=True)
    assert "token_type_ids" not in batch
    first = model.generate(**batch, max_new_tokens=4, do_sample=False)
    again = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert first.shape == (2, batch["input_ids"].shape[1] + 4)
    assert torch.equal(first, again)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")


def test_same_seed_same_weights(tmp_path, bpe):
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    a, _ = load_causal_lm(build_causal_lm(cfg, bpe, tmp_path / "a"))
    b, _ = load_causal_lm(build_causal_lm(cfg, bpe, tmp_path / "b"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_bad_sizes_and_paths_are_named(tmp_path, bpe):
    with pytest.raises(ValueError, match="model.family='gpt9'"):
        build_causal_lm(ModelConfig(family="gpt9"), bpe, tmp_path / "x")
    with pytest.raises(ValueError, match="model.hidden_size=130"):
        build_causal_lm(ModelConfig(hidden_size=130), bpe, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_model_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_model_dir(tmp_path / "empty")


def test_ensure_policy_builds_once_then_reuses(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return CORPUS

    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                      vocab_size=300)
    first = ensure_policy(cfg, texts, tmp_path / "policy")
    second = ensure_policy(cfg, texts, tmp_path / "policy")
    assert first == second and calls == [1]
    assert ensure_policy(ModelConfig(path=str(first)), texts, tmp_path / "other") == first


def test_minilm_wordpiece_tokenizer_drives_a_causal_lm(tmp_path):
    tokenizer = minilm_tokenizer()
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    model, loaded = load_causal_lm(build_causal_lm(cfg, tokenizer, tmp_path / "minilm"))
    batch = loaded(["where was mira born"], return_tensors="pt")
    assert "token_type_ids" not in batch
    assert tokenizer.convert_tokens_to_ids("[CLS]") not in batch["input_ids"][0].tolist()  # no BERT [CLS] ... [SEP] wrapping
    out = model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 2


def test_packaged_embedder_works_offline():
    embedder = load_embedder()
    vectors = embedder.encode(
        ["Who founded the company?", "Which person started the firm?", "The river is cold in winter."],
        normalize_embeddings=True,
    )
    assert vectors.shape == (3, 384)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > unrelated + 0.2
