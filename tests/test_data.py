"""minirlhf.data vs TRL 1.12: RewardTrainer's prepared dataset, collator and data order, SFTTrainer's prompt-completion
tokenization, the PPO example's prompt tokenization, and `datasets`' split mapping for local folders.

The reference side (`theirs_*`) runs the real TRL trainers on a tiny random Llama and transformers' AutoTokenizer on
the same tokenizer files (built by test_tokenizer.write_tokenizer); nothing is downloaded.
"""

import json
import sys
import warnings

import datasets
import pytest
import torch
import transformers
from test_tokenizer import write_tokenizer
from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from minirlhf.data import (
    collate_preference,
    collate_prompts,
    collate_sft,
    prepare_preference_dataset,
    prepare_prompt_dataset,
    prepare_sft_dataset,
    shuffled_order,
)
from minirlhf.infra.files import load_rows
from minirlhf.infra.tokenizer import Tokenizer

datasets.disable_progress_bars()
STYLES = ["byte_level", "llama"]  # ChatML template, no BOS / BOS from the post-processor and in the template
EOS = {"byte_level": "<|endoftext|>", "llama": "</s>"}
WORDS = "the quick brown fox jumps over lazy dog hello world reward policy score".split()


def sentence(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)).capitalize()


def preference_rows(fmt: str, style: str, n: int = 8) -> list[dict]:
    """n rows of one format RewardTrainer accepts (trl/trainer/reward_trainer.py), with varied lengths so a
    max_length filter drops some."""
    rows = []
    for i in range(n):
        prompt, chosen, rejected = sentence(i, 2 + i % 3), " " + sentence(i + 1, 1 + i), " " + sentence(i + 2, 3)
        if fmt == "standard_implicit":
            row = {"chosen": prompt + chosen, "rejected": prompt + rejected}
            if i % 3 == 0:  # already ends with the EOS text: not appended twice
                row["chosen"] += EOS[style]
        elif fmt == "standard_explicit_margin":
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": i / 4}
        elif fmt.startswith("conversational"):
            user = [{"role": "user", "content": prompt}]
            chosen_turn = [{"role": "assistant", "content": chosen.strip()}]
            rejected_turn = [{"role": "assistant", "content": rejected.strip()}]
            if fmt == "conversational_implicit_margin":
                row = {"chosen": user + chosen_turn, "rejected": user + rejected_turn, "margin": float(i % 2)}
            else:
                row = {"prompt": user, "chosen": chosen_turn, "rejected": rejected_turn}
            if fmt == "conversational_tools":
                tools = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": {"type": "object"}}}]
                row.update(tools=json.dumps(tools), chat_template_kwargs={"shout": i % 2 == 0})
        elif fmt in ("pretokenized", "legacy_pretokenized"):
            prefix = "chosen_input_ids" if fmt == "legacy_pretokenized" else "chosen_ids"
            row = {prefix: list(range(3, 4 + i)), prefix.replace("chosen", "rejected"): list(range(5, 8))}
        rows.append(row)
    return rows


FORMATS = ["standard_implicit", "standard_explicit_margin", "conversational_implicit_margin",
           "conversational_explicit", "conversational_tools", "pretokenized", "legacy_pretokenized"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: write_tokenizer(root / style, style) for style in STYLES}


def tiny_llama(head: str, vocab_size: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, num_labels=1)
    cls = transformers.LlamaForSequenceClassification if head == "seq_cls" else transformers.LlamaForCausalLM
    return cls(config)


def theirs_reward_trainer(tokenizer_dir, rows, tmp_path, **config) -> RewardTrainer:
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    args = RewardConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy column FutureWarning, Trainer chatter
        return RewardTrainer(model=tiny_llama("seq_cls", len(theirs_tokenizer)), args=args,
                             processing_class=theirs_tokenizer, train_dataset=datasets.Dataset.from_list(rows))


# ---- preference data

@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_dataset_matches_reward_trainer(tokenizer_dirs, tmp_path, fmt, style):
    rows = preference_rows(fmt, style)
    ours_tokenizer = Tokenizer.from_pretrained(tokenizer_dirs[style])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        unfiltered, _ = prepare_preference_dataset(rows, ours_tokenizer, max_length=None, source=fmt)
        # a max_length between the shortest and longest pair, so the filter drops some but not all
        max_length = sorted(max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in unfiltered)[len(rows) // 2]
        ours_examples, ours_dropped = prepare_preference_dataset(rows, ours_tokenizer, max_length, source=fmt)
    trainer = theirs_reward_trainer(tokenizer_dirs[style], rows, tmp_path, max_length=max_length, pad_to_multiple_of=8)
    columns = ["chosen_ids", "rejected_ids"] + (["margin"] if "margin" in fmt else [])
    theirs_examples = [{key: row[key] for key in columns} for row in trainer.train_dataset]
    assert ours_examples == theirs_examples
    assert 0 < ours_dropped == len(rows) - len(theirs_examples) < len(rows)
    if not fmt.endswith("pretokenized"):
        assert all(ex["chosen_ids"][-1] == ours_tokenizer.eos_token_id for ex in ours_examples) == (
            fmt.startswith("standard"))  # the EOS text becomes the EOS id; templates end turns their own way
    # the collated batch equals DataCollatorForPreference's (right padding, chosen then rejected, margin float32)
    theirs_batch = trainer.data_collator(list(trainer.train_dataset))
    ours_batch = collate_preference(ours_examples, trainer.processing_class.pad_token_id, pad_to_multiple_of=8)
    assert ours_batch.keys() == theirs_batch.keys()
    for key in theirs_batch:
        assert ours_batch[key].dtype == theirs_batch[key].dtype
        torch.testing.assert_close(ours_batch[key], theirs_batch[key], rtol=0, atol=0)


def test_collate_preference_matches_trl_collator():
    examples = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8], "margin": 0.5},
                {"chosen_ids": [1], "rejected_ids": [2, 3, 4, 9, 9], "margin": -1}]
    for pad_to_multiple_of in (None, 4):
        theirs = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)(examples)
        ours = collate_preference(examples, 0, pad_to_multiple_of)
        assert ours["input_ids"].shape == (4, 5 if pad_to_multiple_of is None else 8)
        for key in ("input_ids", "attention_mask", "margin"):
            assert ours[key].dtype == theirs[key].dtype
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)


def test_shuffled_order_matches_trl_dataloader(tokenizer_dirs, tmp_path):
    # rows tell their index through their first chosen token; 10 rows in batches of 4 (the last one short)
    rows = [{"chosen_ids": [100 + i, 1], "rejected_ids": [7]} for i in range(10)]
    trainer = theirs_reward_trainer(tokenizer_dirs["byte_level"], rows, tmp_path, per_device_train_batch_size=4)
    dataloader = trainer.get_train_dataloader()
    for epoch in range(2):
        dataloader.set_epoch(epoch)  # what Trainer's loop does at the start of each epoch
        chosen_halves = [batch["input_ids"][: len(batch["input_ids"]) // 2] for batch in dataloader]
        theirs_order = [int(ids[0]) - 100 for chosen in chosen_halves for ids in chosen]
        assert shuffled_order(len(rows), trainer.args.seed, epoch) == theirs_order
    assert shuffled_order(10, 42, 0) != shuffled_order(10, 42, 1)


@pytest.mark.parametrize(("row", "message"), [
    ({"chosen": "a"}, r"row 2: missing column 'rejected'"),  # rows count from 1, as a file's lines
    ({"chosen": "a", "rejected": ""}, r"row 2: 'rejected' must be a non-empty string"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, r"row 2: 'chosen' must be a non-empty string"),
    ({"chosen": "a", "rejected": "b", "margin": "big"}, r"row 2: 'margin' must be a number"),
])
def test_malformed_preference_row_is_named(tokenizer_dirs, row, message):
    tokenizer = Tokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    rows = [{"chosen": "x", "rejected": "y", "margin": 1.0}, row]
    with pytest.raises(ValueError, match=f"^prefs.jsonl: {message}"):
        prepare_preference_dataset(rows, tokenizer, max_length=None, source="prefs.jsonl")
    conversational = [{"chosen": [{"role": "user", "content": "a"}], "rejected": "b"}]
    with pytest.raises(ValueError, match=r"^prefs: row 1: 'rejected' must be a non-empty list of"):
        prepare_preference_dataset(conversational, tokenizer, max_length=None, source="prefs")
    with pytest.raises(ValueError, match=r"^prefs: row 1: 'rejected_ids' must be a list of token ids"):
        prepare_preference_dataset([{"chosen_ids": [1], "rejected_ids": "1 2"}], tokenizer, None, source="prefs")


# ---- prompts (PPO) and prompt-completion data (SFT)

@pytest.mark.parametrize("style", STYLES)
def test_prompt_dataset_matches_ppo_example(tokenizer_dirs, style):
    ours_tokenizer = Tokenizer.from_pretrained(tokenizer_dirs[style])
    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[style], padding_side="left")
    theirs_tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # as examples/scripts/ppo/ppo.py does
    ours_tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    texts = [sentence(i, 1 + 2 * i) for i in range(4)]
    conversations = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": t}] for t in texts]
    theirs_ids = {
        "text": theirs_tokenizer(texts, padding=False)["input_ids"],  # ppo.py's `tokenize`
        "chat": [theirs_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
                 for c in conversations],
    }
    for kind, prompts in (("text", texts), ("chat", conversations)):
        ours_examples = prepare_prompt_dataset([{"prompt": p} for p in prompts], ours_tokenizer, source=kind)
        assert [ex["input_ids"] for ex in ours_examples] == theirs_ids[kind]
        # PPOTrainer's default collator: DataCollatorWithPadding on a left-padding tokenizer
        theirs_batch = transformers.DataCollatorWithPadding(theirs_tokenizer)(ours_examples)
        ours_batch = collate_prompts(ours_examples, ours_tokenizer.pad_token_id)
        torch.testing.assert_close(ours_batch["input_ids"], theirs_batch["input_ids"], rtol=0, atol=0)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("conversational", [False, True])
def test_sft_dataset_matches_sft_trainer(tokenizer_dirs, tmp_path, style, conversational):
    rows = []
    for i in range(6):
        prompt, completion = sentence(i, 1 + 3 * i), " " + sentence(i + 3, 2 + i % 3)
        if conversational:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": completion.strip()}]})
        else:
            rows.append({"prompt": prompt, "completion": completion + (EOS[style] if i == 1 else "")})
    ours_tokenizer = Tokenizer.from_pretrained(tokenizer_dirs[style])
    # a max_length that cuts into some completions and drops a row whose prompt alone fills it
    full, _ = prepare_sft_dataset(rows, ours_tokenizer, max_length=None, source="sft")
    prompt_lengths = [ex["completion_mask"].index(1) for ex in full]
    full_lengths = [len(ex["input_ids"]) for ex in full]
    max_length = next(m for m in range(1, 100) if any(p >= m for p in prompt_lengths)
                      and any(p < m < n for p, n in zip(prompt_lengths, full_lengths, strict=True)))
    ours_examples, ours_dropped = prepare_sft_dataset(rows, ours_tokenizer, max_length, source="sft")

    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[style])
    args = SFTConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", max_length=max_length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=tiny_llama("causal", len(theirs_tokenizer)), args=args,
                             processing_class=theirs_tokenizer, train_dataset=datasets.Dataset.from_list(rows))
    theirs_examples = [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in trainer.train_dataset]
    assert 0 < ours_dropped == len(rows) - len(theirs_examples)
    assert any(len(ex["input_ids"]) == max_length for ex in ours_examples)
    ours_batch = collate_sft(ours_examples, ours_tokenizer.eos_token_id)
    theirs_batch = DataCollatorForLanguageModeling(pad_token_id=ours_tokenizer.eos_token_id)(theirs_examples)
    assert ours_batch.keys() == theirs_batch.keys()
    for key in ours_batch:
        torch.testing.assert_close(ours_batch[key], theirs_batch[key], rtol=0, atol=0)


# ---- loading rows

def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def test_load_rows_from_files(tmp_path):
    rows = [{"prompt": "a", "margin": 1.5}, {"prompt": "b", "tags": ["x"]}]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    write_jsonl(tmp_path / "lines.json", rows)
    for name in ("rows.jsonl", "list.json", "lines.json"):
        assert load_rows(str(tmp_path / name), split="ignored for a file") == rows
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "rows.parquet")
    theirs_rows = datasets.load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train",
                                        cache_dir=str(tmp_path / "cache")).to_list()
    assert load_rows(str(tmp_path / "rows.parquet"), "train") == theirs_rows


def test_load_rows_split_folders_match_datasets(tmp_path):
    sharded, named, folders = tmp_path / "sharded", tmp_path / "named", tmp_path / "folders"
    write_jsonl(sharded / "data" / "train-00000-of-00002.jsonl", [{"i": 0}])
    write_jsonl(sharded / "data" / "train-00001-of-00002.jsonl", [{"i": 1}, {"i": 2}])
    write_jsonl(sharded / "data" / "descriptiveness-00000-of-00001.jsonl", [{"i": 3}])
    write_jsonl(sharded / "test.jsonl", [{"i": -1}])  # ignored: sharded names win
    write_jsonl(named / "train.jsonl", [{"i": 4}])
    (named / "test.json").write_text(json.dumps([{"i": 5}]))
    write_jsonl(named / "data" / "dev-0.jsonl", [{"i": 6}])  # "dev" names the validation split
    write_jsonl(folders / "dev" / "part-0.jsonl", [{"i": 7}])
    write_jsonl(folders / "train.jsonl", [{"i": 8}])  # ignored: split-named folders win over file names
    cases = [(sharded, "train"), (sharded, "descriptiveness"), (named, "train"), (named, "test"),
             (named, "validation"), (folders, "validation")]
    for folder, split in cases:
        theirs_rows = datasets.load_dataset(str(folder), split=split, cache_dir=str(tmp_path / "cache")).to_list()
        assert load_rows(str(folder), split) == theirs_rows
    with pytest.raises(ValueError, match=r"Unknown split"):
        datasets.load_dataset(str(folders), split="train", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=rf"^{folders}: no data files for split 'train'; available splits: "
                                         r"\['validation'\]"):
        load_rows(str(folders), "train")
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train', 'validation'\]"):
        load_rows(str(named), "eval")


def test_load_rows_from_offline_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "datasets--owner--prefs"
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    write_jsonl(repo / "snapshots" / commit / "data" / "train-00000-of-00001.jsonl", [{"chosen": "a", "rejected": "b"}])
    write_jsonl(repo / "snapshots" / commit / "data" / "test-00000-of-00001.jsonl", [{"chosen": "c", "rejected": "d"}])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert load_rows("owner/prefs", "test") == [{"chosen": "c", "rejected": "d"}]
    assert load_rows("owner/prefs", "train", revision=commit) == [{"chosen": "a", "rejected": "b"}]


def test_load_rows_errors_name_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n{"a": 2,}\n')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'bad.jsonl'}: line 3: invalid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"), "train")
    (tmp_path / "scalars.jsonl").write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"scalars.jsonl: line 2: expected a JSON object, got list"):
        load_rows(str(tmp_path / "scalars.jsonl"), "train")
    with pytest.raises(ValueError, match="no such file or folder"):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "rows.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"rows.parquet: reading parquet needs pyarrow: .*'minirlhf\[parquet\]'"):
        load_rows(str(tmp_path / "rows.parquet"), "train")
