"""A reward model that reads texts: its own tokenizer (decode, re-tokenize), or conversational prompts (the response
put back as an assistant turn with its chat template), against transformers on the same texts; the automatic
detection, its one-line errors, and a PPO run on the shipped conversational prompts.

- Scores vs transformers' AutoModelForSequenceClassification on AutoTokenizer's ids of the same texts (1e-5 fp32):
  the reward tokenizer numbers the words differently from the policy's and has its own chat template.
- reward_tokenizer_if_different: None for the policy's own tokenizer or a reward folder without one.
- Errors: a value model on the reward model's foreign vocabulary; conversations and a reward tokenizer without a
  chat template.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf import ppo
from minirlhf.infra import completions
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.ppo_setup import reward_tokenizer_if_different
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.model import RewardModel

ROOT = Path(__file__).resolve().parents[1]
EOS, PAD = 2, 95
POLICY_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
# the reward side marks the roles with words of its own and ends the assistant turn with its EOS
REWARD_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}w90 {% else %}w91 {% endif %}{{ m['content'] }}"
                   "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}")


def word_tokenizer(folder: Path, ids: dict[str, int], chat_template: str | None):
    """A transformers word-level tokenizer with <eos>, [PAD] and the words w3..w94 at `ids`, saved to `folder`."""
    import transformers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers

    backend = BackendTokenizer(models.WordLevel(ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                     pad_token="[PAD]", padding_side="left")
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """policy/: a tokenizer only; reward/: a random seq-cls Llama whose tokenizer numbers the words in reverse."""
    import tiny

    folder = tmp_path_factory.mktemp("rescoring")
    words = [f"w{i}" for i in range(3, PAD)]
    word_tokenizer(folder / "policy", {"<unk>": 0, "<bos>": 1, "<eos>": EOS, **{w: i for i, w in enumerate(words, 3)},
                                       "[PAD]": PAD}, POLICY_TEMPLATE)
    torch.manual_seed(0)
    reward = tiny.hf_model("llama", head="seq_cls")
    with torch.no_grad():
        reward.score.weight.normal_(0, 1.0)
    reward.save_pretrained(folder / "reward")
    word_tokenizer(folder / "reward", {"[PAD]": 0, "<unk>": 1, "<eos>": 94, **{w: i for i, w in
                                       enumerate(reversed(words), 2)}}, REWARD_TEMPLATE)
    return folder


def batch(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded queries and responses with pads after the stop (one response never stops)."""
    prompts = [tokenizer.encode("w5 w6 w7"), tokenizer.encode("w8 w9")]
    queries = torch.tensor([[PAD] * (3 - len(p)) + p for p in prompts])
    responses = torch.tensor([[10, 11, EOS, PAD], [20, 21, 22, 23]])
    return queries, responses


@pytest.mark.parametrize("conversational", [False, True])
def test_scores_match_transformers_on_the_texts(models, conversational):
    import transformers

    tokenizer = Tokenizer.from_pretrained(models / "policy")
    reward_tokenizer = reward_tokenizer_if_different(ppo.PPOConfig(reward_model_path=str(models / "reward")),
                                                     tokenizer)
    assert reward_tokenizer is not None
    queries, responses = batch(tokenizer)
    messages = [[{"role": "user", "content": "w5 w6 w7"}], [{"role": "user", "content": "w8 w9"}]]
    conversations = {tuple(t for t in q if t != PAD): m for q, m in zip(queries.tolist(), messages, strict=True)}
    reward_model = load_pretrained(RewardModel, str(models / "reward"))
    ours = completions.reward_model_scores(reward_model, reward_tokenizer, tokenizer, queries, responses,
                                       conversations if conversational else {}, None)

    theirs_tokenizer = transformers.AutoTokenizer.from_pretrained(models / "reward")
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(models / "reward",
                                                                                   attn_implementation="eager")
    if conversational:
        answers = ["w10 w11", "w20 w21 w22 w23"]
        full = [m + [{"role": "assistant", "content": a}] for m, a in zip(messages, answers, strict=True)]
        ids = [theirs_tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in full]
        assert ids[0][:2] == theirs_tokenizer.convert_tokens_to_ids(["w90", "w5"])  # its template, its numbers
    else:
        ids = [theirs_tokenizer("w5 w6 w7 w10 w11<eos>")["input_ids"], theirs_tokenizer("w8 w9 w20 w21 w22 w23")[
            "input_ids"]]
    with torch.no_grad():
        theirs = torch.cat([theirs_model(torch.tensor([row])).logits[:, 0] for row in ids])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_detection(models, tmp_path):
    tokenizer = Tokenizer.from_pretrained(models / "policy")
    assert reward_tokenizer_if_different(ppo.PPOConfig(reward_model_path=str(models / "policy")), tokenizer) is None
    (tmp_path / "bare").mkdir()  # a reward model folder without a tokenizer reads the policy's ids
    assert reward_tokenizer_if_different(ppo.PPOConfig(reward_model_path=str(tmp_path / "bare")), tokenizer) is None
    no_model = ppo.PPOConfig(reward_model_path=None, reward_funcs=["minirlhf.infra.toytask:gold_score"])
    assert reward_tokenizer_if_different(no_model, tokenizer) is None


def run_cli(toy_model: Path, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minirlhf.ppo", "--sft_model_path", str(toy_model),
                           "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                          timeout=120)


@pytest.mark.parametrize("flags, message", [
    (["--dataset_name", "configs/toytask/prompts"],
     "value_model_path: vocabulary of 96 tokens, but sft_model_path has 86; it reads the policy's token ids"),
    (["--dataset_name", "configs/toytask/prompts_chat", "--advantage_estimator", "grpo", "--num_generations", "2"],
     "reward_model_path: the prompts are conversations, but the reward model's tokenizer has no chat template"),
])
def test_impossible_combinations_are_one_line_errors(toy_model, models, tmp_path, flags, message):
    (tmp_path / "reward").mkdir()  # the reward model, with a tokenizer lacking a chat template
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "reward" / name).write_bytes((models / "reward" / name).read_bytes())
    config = json.loads((models / "reward" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # transformers 5 writes it to chat_template.jinja, not copied
    (tmp_path / "reward" / "tokenizer_config.json").write_text(json.dumps(config))
    value = ["--value_model_path", str(tmp_path / "reward")] if "value_model_path" in message else []
    result = run_cli(toy_model, tmp_path, "--reward_model_path", str(tmp_path / "reward"), *value, *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_conversational_prompts_smoke_run(toy_model, tmp_path, monkeypatch, capsys):
    """A smoke test: one PPO update on the shipped chat prompts runs through the loop and logs the gold score (a
    reward function) in [0, 1]; no score is compared with anything. Beyond running, it checks the route: the reward
    model (the task's model, random) reads each conversation rendered with its chat template, the response as the
    assistant turn, and the gold score gets TRL's conversational arguments (message lists, not texts)."""
    from minirlhf.infra import toytask

    rendered, gold_args = [], []  # conversations rendered with a response; the gold score's arguments
    real_render, real_gold = Tokenizer.apply_chat_template, toytask.gold_score

    def render(self, messages, *args, **kwargs):
        if messages[-1]["role"] == "assistant":  # the policy's prompts end with the user's turn
            rendered.append(messages)
        return real_render(self, messages, *args, **kwargs)

    def gold_score(prompts, completions, **kwargs):
        gold_args.append((prompts, completions))
        return real_gold(prompts, completions, **kwargs)

    monkeypatch.setattr(Tokenizer, "apply_chat_template", render)
    monkeypatch.setattr(toytask, "gold_score", gold_score)
    monkeypatch.chdir(ROOT)
    out = tmp_path / "chat"
    ppo.main(["--sft_model_path", str(toy_model), "--reward_model_path", str(toy_model),
              "--dataset_name", "configs/toytask/prompts_chat", "--reward_funcs", "minirlhf.infra.toytask:gold_score",
              "--output_dir", str(out), "--per_device_train_batch_size", "8", "--num_ppo_epochs", "1",
              "--response_length", "4", "--stop_token", "eos", "--num_sample_generations", "1",
              "--per_device_eval_batch_size", "4", "--total_episodes", "8", "--save_strategy", "no",
              "--gradient_checkpointing", "false"])
    assert "the reward model reads the decoded texts" in capsys.readouterr().out
    (metrics,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= metrics["objective/gold_score"] <= 1
    completions = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert {"score", "gold_score"} <= set(completions[0])

    chats = [json.loads(line)["prompt"] for split in ("train", "test")
             for line in (ROOT / "configs" / "toytask" / "prompts_chat" / f"{split}.jsonl").read_text().splitlines()]
    assert len(rendered) >= 8 + len(completions), len(rendered)  # the update's 8 rollouts, the sample completions
    for *prompt, answer in rendered:
        assert prompt in chats and answer.keys() == {"role", "content"}, (prompt, answer)
    assert gold_args
    for prompts, answers in gold_args:
        assert all(prompt in chats for prompt in prompts), prompts
        assert all([{"role": "assistant", "content": a[0]["content"]}] == a and isinstance(a[0]["content"], str)
                   for a in answers), answers
