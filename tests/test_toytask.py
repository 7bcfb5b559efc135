"""The shipped toy task (configs/toytask): regenerates byte for byte, pairs are ordered by the gold score and matched
in length, no prompt-blind score separates them, and transformers loads the model folder with the ids we expect."""

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer

from minirlhf.infra import toytask

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "toytask"
_spec = importlib.util.spec_from_file_location("make_toytask", SHIPPED / "make.py")
make = importlib.util.module_from_spec(_spec)  # the writer of the shipped files, beside them
_spec.loader.exec_module(make)
WORD_CATEGORY = {w: c for c, words in toytask.CATEGORIES.items() for w in words}


def read_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED / name).read_text().splitlines()]


def theirs_gold(prompt: str, response: str) -> float:
    """The gold score restated through the word -> category table, for text without special tokens."""
    category = next(w for w in prompt.split() if w in toytask.CATEGORIES)
    words = response.split()
    return Counter(WORD_CATEGORY.get(w) for w in words)[category] / len(words) if words else 0.0


def test_regenerating_gives_the_shipped_files(tmp_path):
    make.write(tmp_path)
    ours = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*") if p.is_file() and p.suffix != ".py"
                    and "__pycache__" not in p.parts)
    assert ours == theirs
    for name in ours:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert sum((SHIPPED / name).stat().st_size for name in theirs) < 1_000_000


def test_gold_score_by_hand():
    assert toytask.gold("name some fruits :", " pear cat lemon") == pytest.approx(2 / 3)
    assert toytask.gold("give me colors :", " red cat<|endoftext|> red red<pad><pad>") == 0.5
    assert toytask.gold("give me colors :", " fruits nonsense") == 0.0  # a category name is no category word
    assert toytask.gold("give me colors :", "<|endoftext|>") == 0.0
    with pytest.raises(ValueError, match="exactly one"):
        toytask.gold("give me colors or fruits :", " red")


@pytest.mark.parametrize("name", ["preference/train.jsonl", "preference/test.jsonl"])
def test_pairs_are_ordered_by_gold_and_matched_in_length(name):
    rows = read_rows(name)
    assert len(rows) == make.SIZES[name.removesuffix(".jsonl")]
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "chosen", "rejected"}, i
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" "), i  # TRL concatenates strings
        chosen, rejected = row["chosen"].split(), row["rejected"].split()
        assert len(chosen) == len(rejected), i
        ours_chosen, ours_rejected = toytask.gold(row["prompt"], row["chosen"]), \
            toytask.gold(row["prompt"], row["rejected"])
        assert ours_chosen == pytest.approx(theirs_gold(row["prompt"], row["chosen"]), abs=1e-12), i
        assert ours_rejected == pytest.approx(theirs_gold(row["prompt"], row["rejected"]), abs=1e-12), i
        assert ours_chosen > ours_rejected, i


def test_prompt_blind_scores_are_at_chance():
    """Length, any single word's count and "most words from one category" each pick chosen about half the time."""
    rows = read_rows("preference/train.jsonl")

    def accuracy(score) -> float:
        diffs = [score(row["chosen"]) - score(row["rejected"]) for row in rows]
        return sum((d > 0) + 0.5 * (d == 0) for d in diffs) / len(diffs)

    assert accuracy(lambda text: len(text.split())) == 0.5
    assert 0.45 < accuracy(lambda text: max(Counter(WORD_CATEGORY[w] for w in text.split()).values())) < 0.55
    for word in WORD_CATEGORY:
        assert 0.45 < accuracy(lambda text, word=word: text.split().count(word)) < 0.55, word


def test_sft_and_prompt_rows():
    vocab = set(make.vocabulary())
    sft = read_rows("sft/train.jsonl") + read_rows("sft/test.jsonl")
    for i, row in enumerate(sft):
        assert set(row) == {"prompt", "completion"} and row["completion"].startswith(" "), i
        words = row["completion"].split()
        assert make.MIN_WORDS <= len(words) <= make.MAX_WORDS and set(words) <= vocab - {"<|endoftext|>"}, i
    # Mediocre on purpose: the mean gold score is about SFT_ON_TOPIC, far below the best possible 1.0.
    mean_gold = sum(theirs_gold(r["prompt"], r["completion"]) for r in sft) / len(sft)
    assert abs(mean_gold - make.SFT_ON_TOPIC) < 0.03
    prompts = {t.format(c) for t in toytask.TEMPLATES for c in toytask.CATEGORIES}
    for name in ["prompts/train.jsonl", "prompts/test.jsonl"]:
        rows = read_rows(name)
        assert all(set(r) == {"prompt"} and r["prompt"] in prompts for r in rows), name
        assert set(Counter(r["prompt"].split()[-2] for r in rows)) == set(toytask.CATEGORIES), name


def test_tokenizer_roundtrip_and_transformers_ids():
    ours = Tokenizer.from_file(str(SHIPPED / "model" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(SHIPPED / "model")
    assert (theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (0, 1, 2)
    assert (theirs.eos_token, theirs.pad_token, theirs.model_max_length) == ("<|endoftext|>", "<pad>", 128)
    vocab = ours.get_vocab()
    rows = read_rows("preference/train.jsonl")[:5] + read_rows("sft/train.jsonl")[:5]
    for row in rows:
        # TRL: prompt + response + EOS text, concatenated as strings (spec 2.2-2.3).
        text = row["prompt"] + row.get("chosen", row.get("completion")) + "<|endoftext|>"
        ids = ours.encode(text).ids
        assert ids == [vocab[w] for w in text.removesuffix("<|endoftext|>").split()] + [0]
        assert theirs(text)["input_ids"] == ids
        words = " ".join(text.removesuffix("<|endoftext|>").split())
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == words
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert ours.encode("name some zebras :").ids == [vocab["name"], vocab["some"], 2, vocab[":"]]


def test_autoconfig_loads_the_model_config():
    config = transformers.AutoConfig.from_pretrained(SHIPPED / "model")
    assert isinstance(config, transformers.LlamaConfig)
    assert config.vocab_size == len(make.vocabulary()) == Tokenizer.from_file(
        str(SHIPPED / "model" / "tokenizer.json")).get_vocab_size()
    assert (config.eos_token_id, config.pad_token_id, config.num_hidden_layers) == (0, 1, 2)
    assert config.rope_parameters["rope_theta"] == 10000.0


def test_chat_format_renders_as_the_plain_format():
    """The toy chat template (make.CHAT_TEMPLATE) renders a conversation as the plain-text format: SFT rows as
    conversations give the same ids and completion mask, and chat prompts the same queries; transformers' template
    rendering agrees."""
    from minirlhf.data import prepare_prompt_dataset, prepare_sft_dataset
    from minirlhf.infra.tokenizer import Tokenizer as OurTokenizer

    ours = OurTokenizer.from_pretrained(SHIPPED / "model")
    theirs = transformers.AutoTokenizer.from_pretrained(SHIPPED / "model")
    plain = read_rows("sft/test.jsonl")[:20]
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "completion": [{"role": "assistant", "content": r["completion"].strip()}]} for r in plain]
    assert prepare_sft_dataset(chat, ours, None) == prepare_sft_dataset(plain, ours, None)
    for row in chat:
        assert ours.apply_chat_template(row["prompt"] + row["completion"], tokenize=True) == \
            theirs.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=False)
    chat_prompts = read_rows("prompts_chat/test.jsonl")
    assert prepare_prompt_dataset(chat_prompts, ours) == prepare_prompt_dataset(
        [{"prompt": r["prompt"][0]["content"]} for r in chat_prompts], ours)
