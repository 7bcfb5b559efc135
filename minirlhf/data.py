"""Datasets as plain lists of dicts: tokenizing rows the way TRL 1.12 does, collating batches, the data order.

Rows come from `infra.files.load_rows` (a .jsonl/.json/.parquet file, a folder of split-named files, or a Hub id).
- `prepare_preference_dataset` + `collate_preference`: RewardTrainer's `_prepare_dataset` and
  `DataCollatorForPreference` (trl/trainer/reward_trainer.py).
- `prepare_prompt_dataset` + `collate_prompts`: the `prompt` column of TRL's PPO example (examples/scripts/ppo/ppo.py),
  left-padded as PPOTrainer expects.
- `prepare_sft_dataset` + `collate_sft`: SFTTrainer's prompt-completion tokenization (trl/trainer/sft_trainer.py).
- `shuffled_order`, `rank_batches`: the epoch order of accelerate's SeedableRandomSampler (accelerate
  data_loader.py), cut into each rank's batches, for all three loops; `prompt_batches`: PPO's prompts in that order,
  resumable at any batch.

Where TRL needs a `datasets.Dataset`, we take `list[dict]` and report a malformed row by its line in the file (or its
row, from 1) instead of failing somewhere inside `Dataset.map`.

Usage:
    rows = load_rows("trl-lib/ultrafeedback_binarized", "train")  # minirlhf.infra.files
    examples, n_dropped = prepare_preference_dataset(rows, tokenizer, max_length=1024, source="ultrafeedback")
    batch = collate_preference(examples[:8], tokenizer.pad_token_id)  # input_ids (16, T): 8 chosen, then 8 rejected
"""

import itertools
import json
import math
import warnings

import torch

from minirlhf.infra.tokenizer import Tokenizer

# ---- checking and tokenizing one row

def _row(rows: list[dict], i: int) -> str:
    """rows[i] as messages name it, counted from 1 as a file's lines are: where load_rows read it ("line 7" of a
    JSON-lines file, blank lines included; "row 7" of a JSON list), else "row {i + 1}"."""
    where = getattr(rows, "where", None)  # infra.files.Rows
    return where[i] if where is not None else f"row {i + 1}"


def is_conversational(row: dict) -> bool:
    """TRL's `is_conversational` (trl/data_utils.py): a prompt/chosen/rejected/completion/messages value is a list of
    {"role": ...} dicts. TRL looks at an arbitrary one of those keys (set.pop); we take the first in that order."""
    key = next((k for k in ("prompt", "chosen", "rejected", "completion", "messages") if k in row), None)
    value = row.get(key)
    return isinstance(value, list) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def _field(row: dict, key: str, conversational: bool, where: str, allow_empty: bool = False) -> str | list[dict]:
    """row[key], checked to be a (non-empty) string, or a non-empty list of messages for conversational data."""
    if key not in row:
        raise ValueError(f"{where}: missing column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if conversational:
        if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
            raise ValueError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} messages like the "
                             f"first row, got {type(value).__name__}")
    elif not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"{where}: {key!r} must be a non-empty string like the first row, got {value!r:.60}")
    return value


def _chat_kwargs(row: dict, where: str) -> dict:
    """tools (a list, or a JSON string as datasets stores it) and chat_template_kwargs for apply_chat_template."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: 'tools' is not valid JSON: {error.msg}") from None
    chat_template_kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(chat_template_kwargs, dict):
        raise ValueError(f"{where}: 'chat_template_kwargs' must be a dict, got {type(chat_template_kwargs).__name__}")
    return {"tools": tools, **chat_template_kwargs}


def _token_ids(row: dict, key: str, where: str) -> list[int]:
    value = row.get(key)
    if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
        raise ValueError(f"{where}: {key!r} must be a list of token ids, got {value!r:.60}")
    return value


def _require_eos(tokenizer: Tokenizer, source: str) -> str:
    if tokenizer.eos_token is None:
        raise ValueError(f"{source}: the tokenizer has no eos_token, needed to end non-conversational text")
    return tokenizer.eos_token


# ---- preference data (reward model)

def prepare_preference_dataset(rows: list[dict], tokenizer: Tokenizer, max_length: int | None,
                               source: str = "dataset") -> tuple[list[dict], int]:
    """RewardTrainer's `_prepare_dataset` (trl/trainer/reward_trainer.py): each example is
    {"chosen_ids", "rejected_ids"[, "margin"]}. Non-conversational text gets the EOS text appended unless it already
    ends with it (decided on the first row); conversations go through the chat template. Pairs with a side longer
    than `max_length` are dropped, not truncated (huggingface/trl#2488); returns (examples, number dropped)."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    first = rows[0]
    id_keys = None  # pre-tokenized columns, if any
    if "chosen_ids" in first and "rejected_ids" in first:
        id_keys = ("chosen_ids", "rejected_ids")
    elif "chosen_input_ids" in first and "rejected_input_ids" in first:
        id_keys = ("chosen_input_ids", "rejected_input_ids")
        warnings.warn(f"{source}: columns chosen_input_ids/rejected_input_ids are deprecated in TRL; read as "
                      "chosen_ids/rejected_ids", FutureWarning, stacklevel=2)
    pretokenized = id_keys is not None
    conversational = not pretokenized and is_conversational(first)
    eos = None if pretokenized or conversational else _require_eos(tokenizer, source)
    examples, n_dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{source}: {_row(rows, i)}"
        if pretokenized:
            example = {"chosen_ids": _token_ids(row, id_keys[0], where),
                       "rejected_ids": _token_ids(row, id_keys[1], where)}
        else:
            chosen = _field(row, "chosen", conversational, where)
            rejected = _field(row, "rejected", conversational, where)
            prompt = _field(row, "prompt", conversational, where, allow_empty=True) if "prompt" in row else None
            if conversational:  # explicit prompt: message lists are concatenated, then rendered as one conversation
                chat_kwargs = _chat_kwargs(row, where)
                prompt = prompt or []
                example = {"chosen_ids": tokenizer.apply_chat_template(prompt + chosen, tokenize=True, **chat_kwargs),
                           "rejected_ids": tokenizer.apply_chat_template(prompt + rejected, tokenize=True,
                                                                         **chat_kwargs)}
            else:  # EOS first, then the plain string concatenation prompt + chosen (no separator)
                chosen = chosen if chosen.endswith(eos) else chosen + eos
                rejected = rejected if rejected.endswith(eos) else rejected + eos
                prompt = prompt or ""
                example = {"chosen_ids": tokenizer.encode(prompt + chosen),
                           "rejected_ids": tokenizer.encode(prompt + rejected)}
        if "margin" in first:
            margin = row.get("margin")
            if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                raise ValueError(f"{where}: 'margin' must be a number, got {margin!r}")
            example["margin"] = float(margin)
        if max_length is not None and max(len(example["chosen_ids"]), len(example["rejected_ids"])) > max_length:
            n_dropped += 1
            continue
        examples.append(example)
    return examples, n_dropped


def pad(sequences: list[list[int]], padding_value: int, padding_side: str = "right",
        pad_to_multiple_of: int | None = None) -> torch.Tensor:
    """TRL's `pad` (trl/trainer/utils.py) for 1-D sequences: (B, T) int64, T the longest rounded up to a multiple."""
    length = max(len(seq) for seq in sequences)
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    output = torch.full((len(sequences), length), padding_value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if padding_side == "right":
            output[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        else:
            output[i, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
    return output


def collate_preference(examples: list[dict], pad_token_id: int,
                       pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """TRL's DataCollatorForPreference (trl/trainer/reward_trainer.py): the B chosen then the B rejected sequences,
    always right-padded."""
    input_ids = [ex["chosen_ids"] for ex in examples] + [ex["rejected_ids"] for ex in examples]
    batch = {
        "input_ids": pad(input_ids, pad_token_id, "right", pad_to_multiple_of),  # (2B, T)
        "attention_mask": pad([[1] * len(ids) for ids in input_ids], 0, "right", pad_to_multiple_of),  # (2B, T)
    }
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float32)  # (B,)
    return batch


# ---- prompts (PPO)

def prepare_prompt_dataset(rows: list[dict], tokenizer: Tokenizer, source: str = "dataset") -> list[dict]:
    """[{"input_ids": [...]}] from a `prompt` column: plain text is tokenized with the tokenizer's defaults, as TRL's
    ppo.py does; a message list is rendered with the chat template and the generation prompt."""
    conversational = bool(rows) and is_conversational(rows[0])
    examples = []
    for i, row in enumerate(rows):
        where = f"{source}: {_row(rows, i)}"
        prompt = _field(row, "prompt", conversational, where)
        if conversational:
            input_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                      **_chat_kwargs(row, where))
        else:
            input_ids = tokenizer.encode(prompt)
        examples.append({"input_ids": input_ids})
    return examples


def collate_prompts(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-padded queries, as PPOTrainer needs (it rebuilds the attention mask from the pad id)."""
    return {"input_ids": pad([ex["input_ids"] for ex in examples], pad_token_id, "left")}  # (B, T)


# ---- prompt-completion data (SFT)

def prepare_sft_dataset(rows: list[dict], tokenizer: Tokenizer, max_length: int | None,
                        source: str = "dataset") -> tuple[list[dict], int]:
    """SFTTrainer's prompt-completion tokenization: input_ids of prompt + completion (+ EOS text for plain text) and
    completion_mask = 0 on the len(tokenize(prompt)) first tokens, 1 after (EOS included). Sequences are truncated
    to `max_length` (keep_start) and dropped if no completion token is left; returns (examples, number dropped)."""
    conversational = bool(rows) and is_conversational(rows[0])
    eos = None if conversational else _require_eos(tokenizer, source)
    examples, n_dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{source}: {_row(rows, i)}"
        prompt = _field(row, "prompt", conversational, where, allow_empty=True)
        completion = _field(row, "completion", conversational, where)
        if conversational:
            chat_kwargs = _chat_kwargs(row, where)
            prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                       **chat_kwargs)
            input_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, **chat_kwargs)
        else:
            completion = completion if completion.endswith(eos) else completion + eos
            prompt_ids = tokenizer.encode(prompt)
            input_ids = tokenizer.encode(prompt + completion)
        if input_ids[: len(prompt_ids)] != prompt_ids:  # TRL warns too: the mask then starts at the wrong token
            warnings.warn(f"{where}: the tokenized prompt is not a prefix of the tokenized prompt + completion",
                          stacklevel=2)
        completion_mask = [0] * len(prompt_ids) + [1] * (len(input_ids) - len(prompt_ids))
        if max_length is not None:
            input_ids, completion_mask = input_ids[:max_length], completion_mask[:max_length]
        if 1 not in completion_mask:
            n_dropped += 1
            continue
        examples.append({"input_ids": input_ids, "completion_mask": completion_mask})
    return examples, n_dropped


def collate_sft(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask; labels are the ids on completion tokens and -100 elsewhere."""
    labels = [[t if m else -100 for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True)]
              for ex in examples]
    return {
        "input_ids": pad([ex["input_ids"] for ex in examples], pad_token_id),  # (B, T)
        "attention_mask": pad([[1] * len(ex["input_ids"]) for ex in examples], 0),  # (B, T)
        "labels": pad(labels, -100),  # (B, T)
    }


# ---- data order

def shuffled_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order accelerate's SeedableRandomSampler gives epoch `epoch` (a generator seeded with seed + epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def rank_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 drop_last: bool) -> list[list[int]]:
    """This rank's batches of epoch `epoch`, as dataset indices: shuffled_order cut into global batches of
    batch_size * world_size, rank r taking the r-th slice of each (accelerate's BatchSamplerShard). A short last
    global batch is dropped (drop_last), kept short in one process, or on several ranks filled up from the start of
    the order (accelerate's even_batches), so that every rank runs the same number of steps."""
    order, global_batch = shuffled_order(n, seed, epoch), batch_size * world_size
    n_batches = n // global_batch if drop_last else math.ceil(n / global_batch)
    batches = [order[i : i + global_batch] for i in range(0, n_batches * global_batch, global_batch)]
    if world_size > 1 and batches and len(batches[-1]) < global_batch:
        batches[-1] += order[: global_batch - len(batches[-1])]
    return [batch[rank * batch_size : (rank + 1) * batch_size] for batch in batches]


def prompt_batches(dataset: list[dict], local_batch_size: int, pad_token_id: int, seed: int, rank: int,
                   world_size: int, start: int = 0):
    """PPO's training prompts from batch `start` on, forever: the rank_batches of epoch 0, 1, ... with drop_last
    (TRL's PPO dataloader drops the incomplete last batch). Yields left-padded queries (local_batch_size, T).

    Departure: PPOTrainer's own Accelerator has no seedable sampler. In one process torch's RandomSampler reseeds
    each epoch from the global RNG, so TRL's order follows everything sampled before; on several ranks one shared
    generator, seeded at setup, gives epoch e its (2e + 1)-th randperm (the sampler draws a spare one per pass).
    """
    batches_per_epoch = len(dataset) // (local_batch_size * world_size)
    for step in itertools.count(start):
        epoch, k = divmod(step, batches_per_epoch)
        indices = rank_batches(len(dataset), local_batch_size, seed, epoch, rank, world_size, drop_last=True)[k]
        yield collate_prompts([dataset[i] for i in indices], pad_token_id)["input_ids"]
