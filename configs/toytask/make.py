"""Writes the toy task's files into this folder (the task and its gold score: minirlhf/infra/toytask.py).

Preference pairs are built so that only the prompt can tell chosen from rejected. Both responses mix the prompt's
category with one other ("distractor") category and have the same length; rejected is chosen with some on-topic
words swapped for distractor words. Swapping the roles of the two categories maps a pair onto an equally likely pair
with chosen and rejected exchanged, so any score that ignores the prompt (length, a word count, "most words from
one category") is right half the time.

Files written into the folder (TRL's standard formats; responses start with a space because TRL concatenates prompt
and response as strings, and TRL appends the EOS text itself):
- `preference/train.jsonl`, `preference/test.jsonl`: {"prompt", "chosen", "rejected"}, gold(chosen) > gold(rejected),
  equal word counts
- `sft/train.jsonl`, `sft/test.jsonl`: {"prompt", "completion"}, each word on topic with probability SFT_ON_TOPIC
- `prompts/train.jsonl`, `prompts/test.jsonl`: {"prompt"}, for PPO rollouts
- `prompts_chat/train.jsonl`, `prompts_chat/test.jsonl`: {"prompt": [{"role": "user", "content"}]}, the same
  kind of prompts as conversations, rendered with the tokenizer's chat template (CHAT_TEMPLATE)
- `model/`: a tiny Llama config.json and a word-level tokenizer, no weights (minirlhf initialises them randomly)

Measured with transformers' LlamaForSequenceClassification from `model/` (random init, AdamW lr 1e-3, batch 32,
linear decay, no warmup): test accuracy 0.995-1.0 after 3 epochs (3 seeds), 0.75-0.86 after 1 epoch; lr 3e-3 is
unstable. A hidden size of 64 instead of 128 reached only 0.75-0.95, depending on the seed.

Usage: `python configs/toytask/make.py` rewrites this folder (or the one given), byte for byte the same every run.
"""

import json
import random
import sys
from pathlib import Path

from minirlhf.infra.toytask import CATEGORIES, SPECIAL_TOKENS, TEMPLATES

MIN_WORDS, MAX_WORDS = 3, 8
SFT_ON_TOPIC = 0.3  # mediocre on purpose, so that PPO can lift the gold score from about here towards 1
# One folder per dataset, with split-named files, so that `dataset_name = "configs/toytask/sft"` finds both splits.
SIZES = {"preference/train": 2000, "preference/test": 200, "sft/train": 2000, "sft/test": 200, "prompts/train": 1000,
         "prompts/test": 200, "prompts_chat/train": 1000, "prompts_chat/test": 200}
MODEL = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4}


def vocabulary() -> list[str]:
    """Every token in id order: special tokens, prompt words, category words."""
    prompt_words = [w for t in TEMPLATES for w in t.split() if w != "{}"] + list(CATEGORIES)
    return list(dict.fromkeys(SPECIAL_TOKENS + prompt_words + sum(CATEGORIES.values(), [])))  # first-seen order


def sample_prompt(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, its category, a distractor category)."""
    category, distractor = rng.sample(list(CATEGORIES), 2)
    return rng.choice(TEMPLATES).format(category), category, distractor


def sample_words(rng: random.Random, category: str, distractor: str, n_words: int, n_on_topic: int) -> list[str]:
    words = [rng.choice(CATEGORIES[category]) for _ in range(n_on_topic)]
    words += [rng.choice(CATEGORIES[distractor]) for _ in range(n_words - n_on_topic)]
    rng.shuffle(words)
    return words


def preference_rows(n: int, rng: random.Random) -> list[dict]:
    """On-topic counts low < high are two distinct values in 0..n_words, uniformly; rejected edits chosen."""
    rows = []
    for _ in range(n):
        prompt, category, distractor = sample_prompt(rng)
        n_words = rng.randint(MIN_WORDS, MAX_WORDS)
        low, high = sorted(rng.sample(range(n_words + 1), 2))
        chosen = sample_words(rng, category, distractor, n_words, high)
        rejected = list(chosen)
        for i in rng.sample([i for i, w in enumerate(chosen) if w in CATEGORIES[category]], high - low):
            rejected[i] = rng.choice(CATEGORIES[distractor])
        rows.append({"prompt": prompt, "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
    return rows


def sft_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        prompt, category, distractor = sample_prompt(rng)
        n_words = rng.randint(MIN_WORDS, MAX_WORDS)
        n_on_topic = sum(rng.random() < SFT_ON_TOPIC for _ in range(n_words))
        completion = " " + " ".join(sample_words(rng, category, distractor, n_words, n_on_topic))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def prompt_rows(n: int, rng: random.Random) -> list[dict]:
    return [{"prompt": sample_prompt(rng)[0]} for _ in range(n)]


def chat_prompt_rows(n: int, rng: random.Random) -> list[dict]:
    """The prompts as conversations: one user message each."""
    return [{"prompt": [{"role": "user", "content": sample_prompt(rng)[0]}]} for _ in range(n)]


# The toy tokenizer's chat template: each message's content and a space, an assistant turn ends with EOS; the
# generation prompt adds nothing. A conversation so renders as the plain-text format does, and the SFT policy and
# reward model trained on plain text read it as they read their own data.
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}"
                 "{{ eos_token }}{% endif %} {% endfor %}")


def tokenizer_json() -> dict:
    """A `tokenizers` word-level tokenizer: special tokens are split out first, then words split on whitespace."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, t in enumerate(SPECIAL_TOKENS)]
    # Without a decoder `tokenizers` decodes by joining the tokens with spaces, which gives the text back.
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(vocabulary())}, "unk_token": "<unk>"}}


def model_config() -> dict:
    """A Llama config.json in the layout transformers 5 writes."""
    heads = MODEL["num_attention_heads"]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocabulary()), **MODEL,
            "num_key_value_heads": heads, "head_dim": MODEL["hidden_size"] // heads, "hidden_act": "silu",
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "attention_bias": False,
            "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1, "dtype": "float32", "use_cache": True}


def write(folder: Path, seed: int = 0) -> None:
    """Write every file of the task; each file draws from its own random stream, so one size can change alone."""
    makers = {"preference": preference_rows, "sft": sft_rows, "prompts": prompt_rows, "prompts_chat": chat_prompt_rows}
    (folder / "model").mkdir(parents=True, exist_ok=True)
    for name, make in makers.items():
        for split in ("train", "test"):
            rows = make(SIZES[f"{name}/{split}"], random.Random(f"{name}/{split}-{seed}"))  # str seeds: stable
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIAL_TOKENS[0],
                        "pad_token": SPECIAL_TOKENS[1], "unk_token": SPECIAL_TOKENS[2], "model_max_length": 128,
                        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    files = {"config.json": model_config(), "tokenizer.json": tokenizer_json(),
             "tokenizer_config.json": tokenizer_config}
    for name, content in files.items():
        (folder / "model" / name).write_text(json.dumps(content, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        raise SystemExit("usage: python configs/toytask/make.py [OUT_FOLDER]")
    write(Path(sys.argv[1]) if len(sys.argv) == 2 else Path(__file__).parent)
