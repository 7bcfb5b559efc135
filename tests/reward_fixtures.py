"""A tiny model folder (random transformers weights + a word-level tokenizer) and preference files, for the
reward-training tests. Both TRL and minirlhf read the very same files."""

import json
import random
from pathlib import Path

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<|endoftext|>", "<pad>"]  # eos id 0, pad id 1


def write_tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                                     pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_model(folder: Path, family: str = "llama", pad_is_eos: bool = False) -> Path:
    """A causal LM folder: random weights, config and tokenizer (pad == eos if asked: no pad token at all)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(SPECIAL) + len(WORDS)
    common = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, eos_token_id=0, bos_token_id=0, pad_token_id=None if pad_is_eos else 1)
    if family == "llama":
        config = transformers.LlamaConfig(**common, num_key_value_heads=2)
    else:
        config = transformers.GPTNeoXConfig(**common, rotary_pct=0.5)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = write_tokenizer(folder)
    if pad_is_eos:
        tokenizer.pad_token = None
        tokenizer.save_pretrained(folder)
    return folder


def write_pairs(path: Path, n: int, seed: int, margin: bool = True) -> Path:
    """Explicit-prompt preference rows of random words, with a float margin; lengths differ so padding matters."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        row = {"prompt": " ".join(rng.choices(WORDS, k=rng.randint(1, 4))),
               "chosen": " " + " ".join(rng.choices(WORDS[:20], k=rng.randint(1, 6))),
               "rejected": " " + " ".join(rng.choices(WORDS[20:], k=rng.randint(1, 6)))}
        if margin:
            row["margin"] = round(rng.uniform(0, 1), 3)
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
