"""The critic-free advantage estimators of minirlhf.advantages against TRL 1.12.0's RLOOTrainer and GRPOTrainer, and
against plain re-statements of their papers' formulas; reward functions and the estimators' config errors.

- RLOO and GRPO vs TRL: the same tiny random Llama (transformers builds it; both sides load the same folder), TRL's
  generation replaced by fixed completions (monkeypatched `_generate_single_turn`), k = 4 samples of 2 prompts, a
  Python reward function of the texts, num_iterations = 2 (our num_ppo_epochs): the advantages (1e-5), the loss of
  both optimisation passes (1e-5; the second sees ratios away from 1 and, with kl_coef > 0, a KL away from 0) and the
  weights after both optimizer steps (1e-4) agree. TRL's reference model is perturbed so that RLOO's KL reward is
  not 0.
- REINFORCE++ vs a loop written from Hu 2025's equations.
- Bad values of the new keys: one line, exit 2.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minirlhf import advantages as adv
from minirlhf import ppo, rollout
from minirlhf.infra import completions
from minirlhf.infra.hf import load_pretrained, to_hf_tensors
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.losses import INVALID_LOGPROB, discounted_returns, grpo_advantages, rloo_advantages
from minirlhf.model import CausalLM, PolicyAndValue, model_inputs
from minirlhf.optim import AdamW, param_groups

TOL = dict(rtol=1e-5, atol=1e-5)
EOS, PAD = 2, 95  # PAD inside the vocabulary: TRL's GRPO/RLOO embed the pad ids they feed
K, T = 4, 6
ROOT = Path(__file__).resolve().parents[1]
# 2 prompts x 4 completions, each a list of ids as TRL's generation returns them (cut after EOS): stops in the
# middle, on the last token, at once, and one that runs to T without EOS
COMPLETIONS = [[10, 11, EOS], [20, 21, 22, 23, 24, 25], [EOS], [30, 31, 32, 33, 34, EOS],
               [40, EOS], [41, 42, 43, EOS], [50, 51, 52, 53, 54, 55], [60, 61, EOS]]


def word_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """A reward function of the texts: the mean word id / 50 (0 for an empty completion)."""
    return [sum(int(w[1:]) for w in c.split()) / 50 / max(len(c.split()), 1) for c in completions]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    """A random 2-layer Llama and a word-level tokenizer whose [PAD] is id 95, in Hugging Face layout."""
    import tiny
    import transformers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny_policy")
    torch.manual_seed(0)
    tiny.hf_model("llama").save_pretrained(folder)
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS, **{f"w{i}": i for i in range(3, PAD)}, "[PAD]": PAD}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                     pad_token="[PAD]", padding_side="left")
    tokenizer.save_pretrained(folder)
    return folder


def run_trl(estimator: str, folder: Path, tmp_path: Path, kl_coef: float) -> dict:
    """One generation, two optimisation passes of TRL's RLOOTrainer or GRPOTrainer on the fixed completions;
    returns what it computed."""
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    Config, Trainer = (RLOOConfig, RLOOTrainer) if estimator == "rloo" else (GRPOConfig, GRPOTrainer)
    args = Config(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2 * K, num_generations=K,
                  max_completion_length=T, num_iterations=2, max_steps=2, learning_rate=1e-2, beta=kl_coef,
                  lr_scheduler_type="constant", max_grad_norm=1.0, bf16=False, report_to="none", save_strategy="no",
                  logging_steps=1, seed=3, temperature=0.9)
    prompts = {"prompt": ["w5 w6 w7", "w8 w9 w10"] * 4}  # equal lengths: TRL passes no position ids, so no left pads
    trainer = Trainer(model=transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"),
                      reward_funcs=word_reward, args=args, train_dataset=datasets.Dataset.from_dict(prompts),
                      processing_class=transformers.AutoTokenizer.from_pretrained(folder))
    if getattr(trainer, "ref_model", None) is not None:  # a reference away from the policy: the KL is not 0
        torch.manual_seed(1)
        with torch.no_grad():
            for p in trainer.ref_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        trainer.ref_model.save_pretrained(tmp_path / "ref")
    recorded = {"losses": []}

    def fixed_generation(prompt_ids, *args, **kwargs):
        recorded["prompt_ids"] = [list(p) for p in prompt_ids]
        return COMPLETIONS if estimator == "rloo" else (COMPLETIONS, None)

    generate_and_score, compute_loss = trainer._generate_and_score_completions, trainer._compute_loss

    def recording_generate_and_score(inputs):
        out = generate_and_score(inputs)
        recorded["advantages"] = out["advantages"].clone()
        return out

    def recording_compute_loss(model, inputs):
        loss = compute_loss(model, inputs)
        recorded["losses"].append(loss.item())
        return loss

    trainer._generate_single_turn = fixed_generation
    trainer._generate_and_score_completions = recording_generate_and_score
    trainer._compute_loss = recording_compute_loss
    trainer.train()
    recorded["weights"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return recorded


@pytest.mark.parametrize("estimator, kl_coef", [("rloo", 0.05), ("grpo", 0.0), ("grpo", 0.3)])
def test_matches_trl(tiny_policy, tmp_path, estimator, kl_coef):
    theirs = run_trl(estimator, tiny_policy, tmp_path, kl_coef)

    # ours: the same prompts and completions; behaviour logprobs from our policy's forward at the temperature
    args = ppo.PPOConfig(per_device_train_batch_size=2 * K, num_mini_batches=1, num_ppo_epochs=2,
                         local_rollout_forward_batch_size=2 * K, response_length=T, temperature=0.9, stop_token="eos",
                         max_grad_norm=1.0, learning_rate=1e-2, total_episodes=2 * K, num_sample_generations=0,
                         gradient_checkpointing=False, advantage_estimator=estimator, num_generations=K,
                         kl_coef=kl_coef, reward_model_path=None, reward_funcs=["test_estimators:word_reward"])
    args.set_runtime_sizes(1, 2)
    queries = torch.tensor(theirs["prompt_ids"])  # (8, 3)
    responses = torch.tensor([c + [PAD] * (T - len(c)) for c in COMPLETIONS])  # (8, T)
    query_responses = torch.cat((queries, responses), 1)
    policy = load_pretrained(CausalLM, str(tiny_policy))
    ref_policy = load_pretrained(CausalLM, str(tmp_path / "ref" if (tmp_path / "ref").exists() else tiny_policy))
    with torch.no_grad():
        logits = policy(*model_inputs(query_responses, PAD), logits_to_keep=T + 1)[:, :-1] / (0.9 + 1e-7)
    logprobs = torch.log_softmax(logits, -1).gather(-1, responses.clamp(max=PAD - 1).unsqueeze(-1)).squeeze(-1)
    rollouts = rollout.score_responses(ref_policy, None, None, queries, query_responses, logprobs, args, PAD, EOS)
    tokenizer = Tokenizer.from_pretrained(str(tiny_policy))
    responses = rollouts["postprocessed_responses"]
    scores = completions.text_scores({"word_reward": word_reward}, tokenizer, queries, responses)
    rollouts["raw_scores"] = rollouts["raw_scores"] + completions.weighted_sum(scores, {"word_reward": 1.0}, "cpu")
    batch = adv.compute_advantages(rollouts, args, EOS)
    ours_advantages = batch["advantages"] if estimator == "rloo" else batch["advantages"][:, 0]
    torch.testing.assert_close(ours_advantages, theirs["advantages"], **TOL)

    model = PolicyAndValue(policy, None).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    stats = ppo.ppo_update(model, optimizer, batch, args, PAD, [torch.arange(2 * K)] * 2)
    assert set(stats) == {"approxkl", "pg_clipfrac", "pg_loss", "entropy", "ratio"}  # no value statistics
    torch.testing.assert_close(stats["pg_loss"].flatten(), torch.tensor(theirs["losses"]), **TOL)
    assert abs(theirs["losses"][1] - theirs["losses"][0]) > 1e-3  # the second pass is not a repeat of the first
    ours_weights = to_hf_tensors(policy.cfg, policy.state_dict())
    for key, value in theirs["weights"].items():
        torch.testing.assert_close(ours_weights[key], value, rtol=1e-4, atol=1e-4, msg=key)


def test_grouped_formulas_match_plain_loops():
    """RLOO's leave-one-out baseline (Ahmadian et al. 2024, Eq. 6) and GRPO's group normalisation (Shao et al.
    2024, Sec. 4.1.2) against loops over each sample."""
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(0))
    k = 3
    theirs_rloo, theirs_grpo = [], []
    for i in range(12):
        group = [rewards[j].item() for j in range(i // k * k, i // k * k + k)]
        others = [r for j, r in enumerate(group) if j != i % k]
        theirs_rloo.append(rewards[i].item() - sum(others) / (k - 1))
        mean = sum(group) / k
        std = (sum((r - mean) ** 2 for r in group) / (k - 1)) ** 0.5
        theirs_grpo.append((rewards[i].item() - mean) / (std + 1e-4))
    torch.testing.assert_close(rloo_advantages(rewards, k), torch.tensor(theirs_rloo), **TOL)
    torch.testing.assert_close(grpo_advantages(rewards, k), torch.tensor(theirs_grpo), **TOL)


def test_reinforce_pp_matches_its_equations():
    """REINFORCE++ (Hu 2025): r_t = -beta * KL_t, plus the score on the last token; A_t = sum_{s >= t} gamma^(s-t)
    r_s; then (A - mean) / std over every response token of the batch."""
    g = torch.Generator().manual_seed(0)
    B, n, gamma, beta = 6, 5, 0.9, 0.1
    lengths = torch.tensor([4, 2, 0, 3, 4, 1])  # L: the last response token
    logprobs, ref_logprobs = -torch.rand(B, n, generator=g), -torch.rand(B, n, generator=g)
    padding = torch.arange(n)[None] > lengths[:, None]
    rollouts = {"responses": torch.ones(B, n, dtype=torch.long), "sequence_lengths": lengths,
                "postprocessed_responses": torch.where(padding, 0, 7), "raw_scores": torch.randn(B, generator=g),
                "raw_logprobs": logprobs, "raw_ref_logprobs": ref_logprobs}
    args = ppo.PPOConfig(advantage_estimator="reinforce_pp", kl_coef=beta, gamma=gamma, missing_eos_penalty=None)
    ours = adv.compute_advantages(rollouts, args, eos_token_id=7)["advantages"]

    theirs = torch.zeros(B, n)
    for b in range(B):
        L = lengths[b].item()
        r = [-beta * (logprobs[b, t] - ref_logprobs[b, t]).item() for t in range(L + 1)]
        r[L] += rollouts["raw_scores"][b].item()
        for t in range(L + 1):
            theirs[b, t] = sum(gamma ** (s - t) * r[s] for s in range(t, L + 1))
    valid = theirs[~padding]
    theirs = torch.where(padding, 0.0, (theirs - valid.mean()) / valid.std())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # 1e-8 inside TRL's whitening rsqrt
    torch.testing.assert_close(discounted_returns(torch.ones(1, 3), 0.5), torch.tensor([[1.75, 1.5, 1.0]]))
    assert INVALID_LOGPROB == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--advantage_estimator", "ppo"], "advantage_estimator: 'ppo' is not one of gae, rloo, grpo, reinforce_pp"),
    (["--advantage_estimator", "rloo"], "num_generations: must be >= 2, got 1"),
    (["--num_generations", "0"], "num_generations: must be >= 1, got 0"),
    (["--advantage_estimator", "grpo", "--num_generations", "3"],
     "num_generations: local_batch_size = 4 is not a multiple of num_generations = 3"),
    (["--reward_funcs", "minirlhf.infra.toytask:nope"], "reward_funcs: cannot import 'minirlhf.infra.toytask:nope'"),
    (["--reward_funcs", "minirlhf.infra.toytask:gold_score", "--reward_weights", "1,2"],
     "reward_weights: 2 weights for 1 reward_funcs"),
    (["--reward_weights", "x"], "reward_weights: expected list[float] | None, got 'x'"),
    (["--reward_model_path", "none"], "reward_model_path: is none and there are no reward_funcs"),
    (["--advantage_estimator", "rloo", "--num_generations", "2", "--value_model_path", "x"],
     "value_model_path: advantage_estimator 'rloo' has no value model"),
])
def test_bad_values_are_one_line_errors(toy_model, tmp_path, flags, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "name some fruits {i} :"}}\n' for i in range(8)))
    result = subprocess.run([sys.executable, "-m", "minirlhf.ppo", "--sft_model_path", str(toy_model),
                             "--dataset_name", str(prompts), "--per_device_train_batch_size", "4",
                             "--output_dir", str(tmp_path / "out"), *flags],
                            capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def run_toy(toy_model: Path, tmp_path: Path, name: str, *flags: str) -> tuple[Path, list[dict]]:
    """One short in-process run on the toy prompts from the task's model (seeded random weights); its metrics."""
    out = tmp_path / name
    ppo.main(["--sft_model_path", str(toy_model), "--dataset_name", "configs/toytask/prompts",
              "--output_dir", str(out), "--per_device_train_batch_size", "8", "--num_mini_batches", "2",
              "--num_ppo_epochs", "1", "--response_length", "4", "--stop_token", "eos", "--num_sample_generations", "0",
              "--save_strategy", "no", "--gradient_checkpointing", "false", "--learning_rate", "1e-3", *flags])
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_reward_functions_add_to_the_reward_model(toy_model, tmp_path, monkeypatch):
    """The first update samples before any training, so with the same seed it sees the same rollouts: adding the
    gold score with weight 2 raises objective/scores by exactly twice the gold score's mean."""
    monkeypatch.chdir(ROOT)
    common = ["--reward_model_path", str(toy_model), "--total_episodes", "8"]
    _, (alone,) = run_toy(toy_model, tmp_path, "rm", *common, "--metric_funcs", "minirlhf.infra.toytask:gold_score")
    _, (both,) = run_toy(toy_model, tmp_path, "both", *common, "--reward_funcs", "minirlhf.infra.toytask:gold_score",
                         "--reward_weights", "2")
    assert both["objective/gold_score"] == alone["objective/gold_score"] > 0
    assert both["objective/scores"] == pytest.approx(alone["objective/scores"] + 2 * alone["objective/gold_score"],
                                                     abs=1e-5)
    assert {"time/generation", "time/scoring", "time/update", "time/tokens_per_second"} <= set(both)
    assert both["time/tokens_per_second"] > 0


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_reward_functions_alone(toy_model, tmp_path, monkeypatch, capsys, estimator):
    """No reward model: the gold score is the reward. GAE's value model starts from the policy; a critic-free
    estimator builds and saves none, and logs no value statistics."""
    monkeypatch.chdir(ROOT)
    out, metrics = run_toy(toy_model, tmp_path, estimator, "--reward_model_path", "none", "--reward_funcs",
                           "minirlhf.infra.toytask:gold_score", "--advantage_estimator", estimator,
                           "--num_generations", "4", "--total_episodes", "16")
    assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["epoch"] == 16 / (4 * 1000)
    assert all(m["objective/scores"] == pytest.approx(m["objective/gold_score"], abs=1e-6) for m in metrics)
    assert (out / "value_model").exists() == ("loss/value_avg" in metrics[0]) == (estimator == "gae")
    assert (f"value model from {toy_model}" in capsys.readouterr().out) == (estimator == "gae")


def test_critic_free_run_resumes_bitwise(toy_model, tmp_path, monkeypatch):
    """RLOO without a value model: a run interrupted after its checkpoint and resumed ends where the uninterrupted
    one does (weights bitwise, every deterministic metric)."""
    monkeypatch.chdir(ROOT)
    flags = ["--reward_model_path", "none", "--reward_funcs", "minirlhf.infra.toytask:gold_score",
             "--advantage_estimator", "rloo", "--num_generations", "2", "--total_episodes", "32",
             "--save_strategy", "steps", "--save_steps", "2"]
    a, _ = run_toy(toy_model, tmp_path, "a", *flags)
    update, calls = ppo.ppo_update, []

    def interrupted_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # update 3, after checkpoint-2
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        run_toy(toy_model, tmp_path, "b", *flags)
    monkeypatch.setattr(ppo, "ppo_update", update)
    b, metrics = run_toy(toy_model, tmp_path, "b", *flags, "--resume_from_checkpoint", "true")
    assert (b / "checkpoint-2").is_dir() and not (b / "checkpoint-2" / "value_model").exists()
    ours, theirs = load_file(b / "model.safetensors"), load_file(a / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    uninterrupted = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for ours_m, theirs_m in zip(metrics, uninterrupted, strict=True):
        assert {k: v for k, v in ours_m.items() if k != "eps" and not k.startswith("time/")} == \
            {k: v for k, v in theirs_m.items() if k != "eps" and not k.startswith("time/")}
