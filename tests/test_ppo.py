"""minirlhf.ppo against TRL 1.12.0's PPOTrainer, and its own guarantees: reproducible sampling, exact resume, DDP.

- One PPO update vs TRL on tiny random Llama models (transformers builds them; both sides load the same folders),
  with TRL's generation replaced by fixed responses and behaviour logits (monkeypatched `batch_generation`) and
  TRL's NumPy minibatch permutations fed to our update: rewards, advantages, returns, every logged metric and the
  updated policy and value weights agree to 1e-5 (fp32). Two updates in a row (AdamW moments carried over, the
  linear schedule's second learning rate) agree too: metrics to 1e-5, weights to 1e-4. TRL's data order is
  checked against ours as well.
- Sampling with a seed repeats exactly, and the behaviour logprobs equal a recomputed forward (1e-5).
- bf16 autocast (bf16=true) stays within bf16 rounding of fp32 through rollouts and an update's gradient.
- A run interrupted after its checkpoint and resumed ends bitwise equal to an uninterrupted one, in one process and
  under `torchrun --nproc_per_node=2`.
- Two gloo ranks (DDP, or FSDP2) equal one process on the same rollouts (fp64, 1e-10).
- The command line: `python -m minirlhf.ppo cfg.toml` runs, and bad data fails with a one-line error.

transformers and trl are imported inside the tests that use them, so the DDP worker processes start fast.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import run_two_ranks
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from minirlhf import ppo, rollout
from minirlhf.data import prompt_batches
from minirlhf.generate import generate
from minirlhf.infra.hf import load_pretrained, save_pretrained, to_hf_tensors
from minirlhf.infra.parallel import cleanup_distributed, full_model_state, gathered_weights, shard_model
from minirlhf.infra.run import autocast
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.losses import INVALID_LOGPROB
from minirlhf.model import CausalLM, PolicyAndValue, RewardModel
from minirlhf.optim import AdamW, lr_multiplier, param_groups, set_lr

TOL = dict(rtol=1e-5, atol=1e-5)
EOS, PAD = 2, 96  # PAD lies outside the models' 96-token vocabulary, as TRL's example adds "[PAD]"
TEMPERATURE = 0.7
ROOT = Path(__file__).resolve().parents[1]


def our_config(**overrides) -> ppo.PPOConfig:
    """A PPOConfig with sizes filled as for one process."""
    kw = dict(per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, local_rollout_forward_batch_size=2,
              response_length=6, temperature=TEMPERATURE, stop_token="eos", missing_eos_penalty=1.0, max_grad_norm=0,
              learning_rate=1e-3, total_episodes=4, num_sample_generations=0, gradient_checkpointing=False)
    kw.update(overrides)
    args = ppo.PPOConfig(**kw)
    args.set_runtime_sizes(1, 8)
    return args


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A random 2-layer Llama policy and seq-cls reward model (transformers), and a word-level tokenizer with an added
    [PAD], saved in Hugging Face layout."""
    import tiny
    import transformers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import models, pre_tokenizers

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tiny.hf_model("llama").save_pretrained(folder / "policy")
    reward = tiny.hf_model("llama", head="seq_cls")
    with torch.no_grad():
        reward.score.weight.normal_(0, 1.0)  # a trained-looking head: scores of order 1
    reward.save_pretrained(folder / "reward")
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS, **{f"w{i}": i for i in range(3, tiny.VOCAB)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>",
                                                     padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    assert tokenizer.pad_token_id == PAD
    tokenizer.save_pretrained(folder / "policy")
    return folder


def fixed_responses(B: int = 4) -> torch.Tensor:
    """(B, 6) responses covering every case of TRL's response post-processing: a stop in the middle, none (the score
    goes on the last token and the EOS penalty applies), an empty response, and a stop on the last token. After a
    stop, EOS repeats, as transformers' generate pads finished rows when the model has no pad id."""
    rows = [[10, 11, EOS, EOS, EOS, EOS], [20, 21, 22, 23, 24, 25], [EOS, EOS, EOS, EOS, EOS, EOS],
            [30, 31, 32, 33, 34, EOS]]
    return torch.tensor(rows * (B // 4))


# ---------------------------------------------------------------------------------------------------------------------
# One update against TRL


@pytest.mark.parametrize("batch_size, kl_estimator, whiten_rewards", [(4, "k1", False), (16, "k3", True)])
def test_update_matches_trl(tiny_models, tmp_path, monkeypatch, batch_size, kl_estimator, whiten_rewards):
    import datasets
    import transformers
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    # 2B prompts of 2-5 tokens: TRL's first batch is B of them
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (2 * batch_size,), generator=g).tolist()
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    responses = fixed_responses(batch_size)

    recorded = {}

    def theirs_batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        # stands in for sampling: fixed tokens, and the policy's own logits at the temperature plus noise as the
        # behaviour logits (so the first ratios are near 1 but not exactly, and some get clipped)
        query_responses = torch.cat((queries, responses), 1)
        context_length = queries.shape[1]
        with torch.no_grad():
            logits = trl_ppo.forward(model, query_responses, pad_token_id).logits[:, context_length - 1 : -1]
        logits = logits / (TEMPERATURE + 1e-7) + 0.3 * torch.randn(logits.shape, generator=g)
        recorded.update(queries=queries.clone(), logits=logits.clone())
        return query_responses, logits

    def theirs_masked_whiten(values, mask, shift_mean=True):
        out = trl_masked_whiten(values, mask, shift_mean)
        if shift_mean:  # the call on the advantages: its caller's locals hold everything before the update
            recorded.update(sys._getframe(1).f_locals, whitened=out)
        return out

    permutations = []

    def theirs_permutation(n):
        permutations.append(np_permutation(n))
        return permutations[-1]

    # TRL draws the minibatch permutations from NumPy's global RNG and never seeds it: seed it, so this test is
    # deterministic. Over 25 seeds, 2 left one updated weight element of ~40k at 1.1e-5 / 1.5e-5 from TRL's (all
    # others <= 3e-6): Adam's first steps turn float32 summation-order noise on a near-zero gradient into a step.
    np.random.seed(0)
    trl_masked_whiten, np_permutation = trl_ppo.masked_whiten, np.random.permutation
    monkeypatch.setattr(trl_ppo, "batch_generation", theirs_batch_generation)
    monkeypatch.setattr(trl_ppo, "masked_whiten", theirs_masked_whiten)
    monkeypatch.setattr(np.random, "permutation", theirs_permutation)

    load = dict(attn_implementation="eager")
    sizes = dict(per_device_train_batch_size=batch_size, total_episodes=batch_size, kl_estimator=kl_estimator,
                 whiten_rewards=whiten_rewards)
    theirs_args = TRLPPOConfig(output_dir=str(tmp_path / "trl"), **sizes,
                               gradient_accumulation_steps=1, num_mini_batches=2, num_ppo_epochs=2,
                               local_rollout_forward_batch_size=2, response_length=6, temperature=TEMPERATURE,
                               stop_token="eos", missing_eos_penalty=1.0, learning_rate=1e-3,
                               num_sample_generations=0, bf16=False, report_to="none", save_strategy="no", seed=3)
    dataset = datasets.Dataset.from_dict({"input_ids": prompts})
    trainer = PPOTrainer(
        args=theirs_args,
        processing_class=transformers.AutoTokenizer.from_pretrained(tiny_models / "policy"),
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_models / "policy", **load),
        ref_model=None,
        reward_model=transformers.AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward", **load),
        value_model=transformers.AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward", **load),
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    trainer.train()
    theirs_metrics = trainer.state.log_history[-1]

    # ours: the same queries, fixed responses and behaviour logprobs, models loaded from the same folders
    args = our_config(seed=3, **sizes)
    args.set_runtime_sizes(1, len(prompts))
    queries = recorded["queries"]
    query_responses = torch.cat((queries, responses), 1)
    logprobs = torch.log_softmax(recorded["logits"], -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    policy = load_pretrained(CausalLM, str(tiny_models / "policy"))
    ref_policy = load_pretrained(CausalLM, str(tiny_models / "policy")).eval()
    value_model = load_pretrained(RewardModel, str(tiny_models / "reward"))
    reward_model = load_pretrained(RewardModel, str(tiny_models / "reward")).eval()
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    rollouts = rollout.score_responses(ref_policy, value_model, reward_model, queries, query_responses, logprobs, args,
                                       PAD, EOS)
    batch = ppo.compute_advantages(rollouts, args, EOS)
    orders = [torch.as_tensor(p) for p in permutations]
    assert len(orders) == args.num_ppo_epochs
    stats = ppo.ppo_update(model, optimizer, batch, args, PAD, orders)
    ours_metrics = {**ppo.update_metrics(batch, stats, EOS), "lr": args.learning_rate, "episode": batch_size,
                    "epoch": 0.5, "step": 1}

    # rollout post-processing (TRL's masks, rewards, GAE)
    theirs_advantages = torch.masked_fill(recorded["whitened"], recorded["padding_mask"], 0)
    for key in ("scores", "logprobs", "ref_logprobs", "values", "rewards", "returns", "non_score_reward"):
        torch.testing.assert_close(batch[key], recorded[key], **TOL, msg=key)
    torch.testing.assert_close(batch["advantages"], theirs_advantages, **TOL)
    for key in ("sequence_lengths", "padding_mask", "padding_mask_p1", "postprocessed_responses"):
        torch.testing.assert_close(batch[key], recorded[key], rtol=0, atol=0, msg=key)
    assert batch["padding_mask"].any() and (batch["scores"] < rollouts["raw_scores"]).any()  # cases really exercised

    # every logged metric but the speed
    assert set(ours_metrics) == set(theirs_metrics) - {"eps"}
    for key, value in ours_metrics.items():
        assert value == pytest.approx(theirs_metrics[key], rel=1e-5, abs=1e-5), key
    assert 0 < ours_metrics["policy/clipfrac_avg"] < 1

    # updated weights of the policy and the value model
    for ours, theirs in ((policy, trainer.model.policy), (value_model, trainer.model.value_model)):
        ours_state = to_hf_tensors(ours.cfg, ours.state_dict())
        theirs_state = theirs.state_dict()
        assert set(ours_state) == set(theirs_state)
        for name, tensor in ours_state.items():
            torch.testing.assert_close(tensor, theirs_state[name], **TOL, msg=name)
    start = load_file(tiny_models / "policy" / "model.safetensors")["lm_head.weight"]
    assert (to_hf_tensors(policy.cfg, policy.state_dict())["lm_head.weight"] - start).abs().max() > 1e-4


def test_two_updates_match_trl(tiny_models, tmp_path, monkeypatch):
    """Two updates: the second starts from the first one's weights, AdamW moments and the next learning rate of the
    linear schedule. TRL's generation is replaced as above; its batches and behaviour logits of each update are fed
    to ours (TRL's data order follows its unseeded global RNGs). Logged metrics of both updates within
    1e-5; final weights within 1e-4, as Adam's 8 steps amplify float32 summation-order noise (see the reward test)."""
    import datasets
    import transformers
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    batch_size, updates = 4, 2
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 6, (updates * batch_size,), generator=g).tolist()
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in lengths]
    responses = fixed_responses(batch_size)
    calls = []

    def theirs_batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        query_responses = torch.cat((queries, responses), 1)
        with torch.no_grad():
            logits = trl_ppo.forward(model, query_responses, pad_token_id).logits[:, queries.shape[1] - 1 : -1]
        logits = logits / (TEMPERATURE + 1e-7) + 0.3 * torch.randn(logits.shape, generator=g)
        calls.append((queries.clone(), logits.clone()))
        return query_responses, logits

    permutations, np_permutation = [], np.random.permutation

    def theirs_permutation(n):
        permutations.append(np_permutation(n))
        return permutations[-1]

    np.random.seed(0)  # as in test_update_matches_trl
    monkeypatch.setattr(trl_ppo, "batch_generation", theirs_batch_generation)
    monkeypatch.setattr(np.random, "permutation", theirs_permutation)
    load = dict(attn_implementation="eager")
    sizes = dict(per_device_train_batch_size=batch_size, total_episodes=updates * batch_size, num_mini_batches=2,
                 num_ppo_epochs=2, local_rollout_forward_batch_size=2, response_length=6, temperature=TEMPERATURE,
                 stop_token="eos", missing_eos_penalty=1.0, learning_rate=1e-3, seed=3)
    trainer = PPOTrainer(
        args=TRLPPOConfig(output_dir=str(tmp_path / "trl"), **sizes, gradient_accumulation_steps=1,
                          num_sample_generations=0, bf16=False, report_to="none", save_strategy="no"),
        processing_class=transformers.AutoTokenizer.from_pretrained(tiny_models / "policy"),
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_models / "policy", **load),
        ref_model=None,
        reward_model=transformers.AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward", **load),
        value_model=transformers.AutoModelForSequenceClassification.from_pretrained(tiny_models / "reward", **load),
        train_dataset=datasets.Dataset.from_dict({"input_ids": prompts}),
        eval_dataset=datasets.Dataset.from_dict({"input_ids": prompts}),
    )
    trainer.train()
    theirs_metrics = [r for r in trainer.state.log_history if "objective/kl" in r]
    assert len(calls) == len(theirs_metrics) == updates and len(permutations) == updates * 2

    args = our_config(**{k: v for k, v in sizes.items() if k != "total_episodes"}, total_episodes=updates * batch_size)
    args.set_runtime_sizes(1, len(prompts))
    policy, value_model = (load_pretrained(cls, str(tiny_models / name))
                           for cls, name in ((CausalLM, "policy"), (RewardModel, "reward")))
    ref_policy = load_pretrained(CausalLM, str(tiny_models / "policy")).eval()
    reward_model = load_pretrained(RewardModel, str(tiny_models / "reward")).eval()
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    for update, (queries, logits) in enumerate(calls, 1):
        lr = args.learning_rate * lr_multiplier(update - 1, args.num_total_batches, 0, "linear")
        set_lr(optimizer, lr)  # as ppo.main does
        query_responses = torch.cat((queries, responses), 1)
        logprobs = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
        rollouts = rollout.score_responses(ref_policy, value_model, reward_model, queries, query_responses, logprobs,
                                           args, PAD, EOS)
        batch = ppo.compute_advantages(rollouts, args, EOS)
        orders = [torch.as_tensor(p) for p in permutations[(update - 1) * 2 : update * 2]]
        stats = ppo.ppo_update(model, optimizer, batch, args, PAD, orders)
        ours = {**ppo.update_metrics(batch, stats, EOS), "lr": lr}
        theirs = theirs_metrics[update - 1]
        for key, value in ours.items():
            assert value == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), (update, key)
    assert theirs_metrics[1]["lr"] == pytest.approx(0.5 * theirs_metrics[0]["lr"])  # the schedule moved
    for ours_model, theirs_model in ((policy, trainer.model.policy), (value_model, trainer.model.value_model)):
        ours_state, theirs_state = to_hf_tensors(ours_model.cfg, ours_model.state_dict()), theirs_model.state_dict()
        for name, tensor in ours_state.items():
            torch.testing.assert_close(tensor, theirs_state[name], rtol=1e-4, atol=1e-4, msg=name)


def test_prompt_order_is_accelerates_seedable_sampler_sharded_by_rank():
    from accelerate import Accelerator
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    Accelerator()  # accelerate's state must exist; nothing is distributed here
    examples = [{"input_ids": [i + 3]} for i in range(20)]  # a one-token prompt per row names the row
    args = our_config(seed=5)
    args.set_runtime_sizes(2, len(examples))  # local batch 4, 2 ranks: 2 full rounds per epoch, 4 rows dropped
    for rank in range(2):
        ours = prompt_batches(examples, args.local_batch_size, PAD, 5, rank, world_size=2)
        theirs = prepare_data_loader(
            DataLoader(examples, batch_size=4, shuffle=True, drop_last=True, collate_fn=lambda b: b),
            num_processes=2, process_index=rank, put_on_device=False, use_seedable_sampler=True, data_seed=5)
        theirs_ids = [[[e["input_ids"][0]] for e in b] for _ in range(3) for b in theirs]  # three epochs
        assert [next(ours).tolist() for _ in theirs_ids] == theirs_ids
        # from epoch 1, its 2nd batch
        resumed = prompt_batches(examples, args.local_batch_size, PAD, 5, rank, world_size=2, start=3)
        assert [next(resumed).tolist() for _ in theirs_ids[3:]] == theirs_ids[3:]


# ---------------------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible_and_logprobs_match_a_forward(tiny_models):
    args = our_config(response_length=8, local_rollout_forward_batch_size=3)
    policy = load_pretrained(CausalLM, str(tiny_models / "policy"))
    with torch.no_grad():  # sharper logits, so that tokens repeat and rows stop at different steps
        policy.lm_head.weight.mul_(30)
    queries = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10], [PAD, 11, 12, 13], [PAD, PAD, PAD, 14], [15, 16, 17, 18]])
    torch.manual_seed(7)
    sampled = rollout.sample_responses(policy, queries, args, PAD, None)[0][:, queries.shape[1]:]
    stop = sampled.flatten().mode().values.item()  # the most frequent token serves as the stop token
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(rollout.sample_responses(policy, queries, args, PAD, stop))
    (ours_qr, ours_logprobs), (again_qr, again_logprobs) = runs
    assert torch.equal(ours_qr, again_qr) and torch.equal(ours_logprobs, again_logprobs)
    torch.manual_seed(8)
    assert not torch.equal(rollout.sample_responses(policy, queries, args, PAD, stop)[0], ours_qr)

    # the behaviour logprobs are those of a plain forward at the same temperature, on every non-padding position
    reward_model = load_pretrained(RewardModel, str(tiny_models / "reward"))
    rollouts = rollout.score_responses(policy, reward_model, reward_model, queries, ours_qr, ours_logprobs, args, PAD,
                                       stop)
    batch = ppo.compute_advantages(rollouts, args, EOS)
    assert batch["padding_mask"].any() and not batch["padding_mask"].all()
    valid = ~batch["padding_mask"]
    torch.testing.assert_close(ours_logprobs[valid], rollouts["raw_ref_logprobs"][valid], **TOL)
    assert torch.all(batch["logprobs"][~valid] == INVALID_LOGPROB)


def test_bf16_autocast_tracks_fp32(tiny_models):
    """bf16=true (CPU autocast; TRL's PPO ignores the flag) through rollouts and one update: within bf16 rounding of
    fp32. bf16 keeps 8 significant bits (0.2% relative rounding per operation), so a 2-layer model stays within ~1%;
    the bounds are a few times that. One SGD step on the whole batch, so that the weight change is the gradient
    itself: Adam's first step is lr * sign(gradient), which flips for gradients near zero, and after a first step the
    ratio clipping, a discontinuity, can fall differently in bf16."""
    args = our_config(num_ppo_epochs=1, num_mini_batches=1)
    queries = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10], [PAD, 11, 12, 13], [PAD, PAD, PAD, 14]])
    policy = load_pretrained(CausalLM, str(tiny_models / "policy"))
    reward_model = load_pretrained(RewardModel, str(tiny_models / "reward"))
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        query_responses, logprobs = rollout.sample_responses(policy, queries, args, PAD, EOS)
    rollouts = {}
    for precision in (None, torch.bfloat16):
        with autocast(torch.device("cpu"), precision):
            rollouts[precision] = rollout.score_responses(policy, reward_model, reward_model, queries,
                                                          query_responses, logprobs, args, PAD, EOS)
    fp32, bf16 = rollouts[None], rollouts[torch.bfloat16]
    valid = ~ppo.compute_advantages(fp32, args, EOS)["padding_mask"]
    # behaviour logprobs sampled under autocast agree with a forward in bf16 and in fp32
    for reference in (bf16["raw_ref_logprobs"], fp32["raw_ref_logprobs"]):
        assert (logprobs - reference)[valid].abs().max() < 0.03
    for key in ("raw_values", "raw_scores"):
        assert (bf16[key] - fp32[key]).abs().max() < 0.03 * fp32[key].abs().max(), key

    batch = ppo.compute_advantages(fp32, args, EOS)  # the same rollouts for both updates
    deltas, stats = {}, {}
    for precision in (None, torch.bfloat16):
        model = PolicyAndValue(load_pretrained(CausalLM, str(tiny_models / "policy")),
                               load_pretrained(RewardModel, str(tiny_models / "reward")))
        start = {name: p.detach().clone() for name, p in model.named_parameters()}
        orders = [torch.arange(args.local_batch_size)] * args.num_ppo_epochs
        stats[precision] = ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, args, PAD,
                                          orders, precision)
        deltas[precision] = {name: p.detach() - start[name] for name, p in model.named_parameters()}
    for name, delta in deltas[None].items():
        error = (deltas[torch.bfloat16][name] - delta).norm() / delta.norm()
        assert error < 0.03, (name, error.item())
    for key in ("pg_loss", "vf_loss", "approxkl"):
        torch.testing.assert_close(stats[torch.bfloat16][key], stats[None][key], rtol=0.03, atol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# Command line, resume


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The shipped toy task with a random SFT policy and reward model, and PPO flags for a 4-update run."""
    folder = tmp_path_factory.mktemp("toy")
    shutil.copytree(Path(__file__).resolve().parents[1] / "configs" / "toytask", folder / "task")
    torch.manual_seed(0)
    policy = load_pretrained(CausalLM, str(folder / "task" / "model"), new_model=True)
    save_pretrained(policy, str(folder / "sft"))
    Tokenizer.from_pretrained(folder / "task" / "model").save_pretrained(folder / "sft")
    save_pretrained(load_pretrained(RewardModel, str(folder / "sft")), str(folder / "reward"))
    prompts = (folder / "task" / "prompts" / "train.jsonl").read_text().splitlines()[:16]
    (folder / "prompts.jsonl").write_text("\n".join(prompts) + "\n")
    flags = ["--sft_model_path", str(folder / "sft"), "--reward_model_path", str(folder / "reward"),
             "--dataset_name", str(folder / "prompts.jsonl"), "--per_device_train_batch_size", "4",
             "--local_rollout_forward_batch_size", "2", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
             "--total_episodes", "16", "--response_length", "6", "--stop_token", "eos", "--learning_rate", "1e-3",
             "--save_steps", "2", "--num_sample_generations", "2", "--per_device_eval_batch_size", "4",
             "--metric_funcs", "minirlhf.infra.toytask:gold_score", "--disable_tqdm", "true"]
    return folder, flags


def deterministic(metrics: dict) -> dict:
    """A metrics record without its wall-clock numbers (eps, time/*)."""
    return {k: v for k, v in metrics.items() if k != "eps" and not k.startswith("time/")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_is_bitwise_equal(toy_run, tmp_path, monkeypatch):
    folder, flags = toy_run
    ppo.main([*flags, "--output_dir", str(tmp_path / "a"), "--gradient_checkpointing", "true"])

    ppo_update, calls = ppo.ppo_update, []

    def interrupted_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # update 3, after checkpoint-2
            raise KeyboardInterrupt
        return ppo_update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", interrupted_update)
    b_flags = [*flags, "--output_dir", str(tmp_path / "b"), "--gradient_checkpointing", "true"]
    with pytest.raises(KeyboardInterrupt):
        ppo.main(b_flags)
    monkeypatch.setattr(ppo, "ppo_update", ppo_update)
    ppo.main([*b_flags, "--resume_from_checkpoint", "true"])

    for sub in ("", "value_model"):
        ours = load_file(tmp_path / "b" / sub / "model.safetensors")
        uninterrupted = load_file(tmp_path / "a" / sub / "model.safetensors")
        assert all(torch.equal(ours[k], uninterrupted[k]) for k in uninterrupted)
    ours_metrics, uninterrupted_metrics = read_jsonl(tmp_path / "b" / "metrics.jsonl"), read_jsonl(
        tmp_path / "a" / "metrics.jsonl")
    assert [m["step"] for m in ours_metrics] == [1, 2, 3, 4]
    for ours, uninterrupted in zip(ours_metrics, uninterrupted_metrics, strict=True):
        assert deterministic(ours) == deterministic(uninterrupted)
    assert read_jsonl(tmp_path / "b" / "completions.jsonl") == read_jsonl(tmp_path / "a" / "completions.jsonl")


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minirlhf.ppo", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_cli_runs_and_writes_its_outputs(toy_run, tmp_path):
    folder, flags = toy_run
    config = tmp_path / "ppo.toml"
    config.write_text(f'sft_model_path = "{folder / "sft"}"\nreward_model_path = "{folder / "reward"}"\n'
                      f'output_dir = "{tmp_path / "out"}"\n')
    kept = [f for f in flags if f not in ("--sft_model_path", "--reward_model_path", str(folder / "sft"),
                                          str(folder / "reward"))]
    result = run_cli([str(config), *kept, "--total_episodes", "8"])
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.toml", "value_model/config.json",
                 "checkpoint-2/optimizer.pt", "checkpoint-2/value_model/model.safetensors"):
        assert (out / name).is_file(), name
    metrics = read_jsonl(out / "metrics.jsonl")
    expected = {"eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                "objective/scores", "objective/gold_score", "policy/approxkl_avg", "policy/clipfrac_avg",
                "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "policy/entropy_avg", "val/ratio",
                "val/ratio_var", "val/num_eos_tokens", "lr", "episode", "epoch", "step",
                "time/generation", "time/scoring", "time/update", "time/tokens_per_second"}
    assert [m["step"] for m in metrics] == [1, 2] and set(metrics[0]) == expected
    completions = read_jsonl(out / "completions.jsonl")
    assert {"step", "query", "response", "score", "gold_score"} <= set(completions[0])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt column"}\n')
    # another output_dir: out holds the finished run, which is refused before the data is read
    result = run_cli([str(config), *kept, "--dataset_name", str(bad), "--output_dir", str(tmp_path / "other")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {bad} [train]: line 1: missing column 'prompt' "
                                                  "(columns: ['text'])"]


def test_max_grad_norm_clips_the_joint_gradient(tiny_models):
    """max_grad_norm (which TRL's PPO ignores) clips the gradient of policy and value together, as
    torch.nn.utils.clip_grad_norm_ over both: with SGD, one step of a clipped run moves the weights by
    lr * max_grad_norm / ||g|| times the unclipped run's step."""
    policy = load_pretrained(CausalLM, str(tiny_models / "policy"))
    reward_model = load_pretrained(RewardModel, str(tiny_models / "reward"))
    queries = torch.tensor([[PAD, PAD, 5, 6], [7, 8, 9, 10], [PAD, 11, 12, 13], [PAD, PAD, PAD, 14]])
    torch.manual_seed(0)
    args = our_config(num_ppo_epochs=1, num_mini_batches=1)
    query_responses, logprobs = rollout.sample_responses(policy, queries, args, PAD, EOS)
    batch = ppo.compute_advantages(rollout.score_responses(policy, reward_model, reward_model, queries, query_responses,
                                                           logprobs, args, PAD, EOS), args, EOS)
    deltas = {}
    for max_grad_norm in (0.0, 1e-3):
        # float64 weights, so that p_new - p_old carries no rounding of the weights (1e-7 of a norm weight of 1)
        model = PolicyAndValue(load_pretrained(CausalLM, str(tiny_models / "policy"), dtype=torch.float64),
                               load_pretrained(RewardModel, str(tiny_models / "reward"), dtype=torch.float64))
        start = [p.detach().clone() for p in model.parameters()]
        ppo.ppo_update(model, torch.optim.SGD(model.parameters(), lr=1.0), batch,
                       our_config(num_ppo_epochs=1, num_mini_batches=1, max_grad_norm=max_grad_norm), PAD,
                       [torch.arange(4)])
        moved = zip(model.parameters(), start, strict=True)
        deltas[max_grad_norm] = torch.cat([(p.detach() - s).flatten() for p, s in moved])
    unclipped_norm = deltas[0.0].norm()
    assert unclipped_norm > 1e-2  # the clip is active
    # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    torch.testing.assert_close(deltas[1e-3], deltas[0.0] * (1e-3 / (unclipped_norm + 1e-6)), rtol=1e-6, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", ["none", "full_shard"])
def test_torchrun_two_ranks_run_and_resume_bitwise(toy_run, tmp_path, fsdp):
    """`torchrun --nproc_per_node=2 -m minirlhf.ppo`, with DDP or with all four models sharded by FSDP2: 3 updates of
    2 x 4 rollouts; a second run that starts from the first one's checkpoint-1 alone (as if killed during update 2)
    ends with the same weights, metrics and sample completions, bit for bit: every rank restores its own sampling
    RNG and prompt position."""
    folder, flags = toy_run
    common = [*flags, "--total_episodes", "24", "--save_steps", "1", "--num_sample_generations", "3", "--fsdp", fsdp]

    def torchrun(output_dir: Path, *extra: str) -> None:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "minirlhf.ppo", *common, "--output_dir", str(output_dir), *extra],
                                capture_output=True, text=True, timeout=300, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("FSDP2 full_shard: rank 0 holds") == (4 if fsdp != "none" else 0)

    torchrun(tmp_path / "a")
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-1")
    torchrun(tmp_path / "b", "--resume_from_checkpoint", "true")

    for sub in ("", "value_model"):
        ours = load_file(tmp_path / "b" / sub / "model.safetensors")
        uninterrupted = load_file(tmp_path / "a" / sub / "model.safetensors")
        assert all(torch.equal(ours[k], uninterrupted[k]) for k in uninterrupted), sub
    uninterrupted_metrics = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [m["step"] for m in uninterrupted_metrics] == [1, 2, 3]
    assert uninterrupted_metrics[0]["episode"] == 8  # batch_size = 4 per rank x 2 ranks
    resumed_metrics = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    for ours, uninterrupted in zip(resumed_metrics, uninterrupted_metrics[1:], strict=True):
        assert deterministic(ours) == deterministic(uninterrupted)
    completions = read_jsonl(tmp_path / "a" / "completions.jsonl")
    assert [r["step"] for r in completions] == [1] * 4 + [2] * 4 + [3] * 4 + [3] * 16  # 3 updates, then all 16
    assert read_jsonl(tmp_path / "b" / "completions.jsonl") == completions[4:]


# ---------------------------------------------------------------------------------------------------------------------
# Two ranks vs one process


def _ddp_worker(rank: int, world_size: int, port: int, folder: str, fsdp: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    data = torch.load(Path(folder) / "rollouts.pt")
    args = our_config(per_device_train_batch_size=2, gradient_accumulation_steps=2, fsdp=fsdp)
    args.set_runtime_sizes(world_size, 8, rank)
    model, optimizer, batch = ddp_setup(folder, data[rank], args)
    if fsdp:  # shard, then build the optimizer on the shards, as ppo.main does
        for m in (model.policy, model.value_model):
            shard_model(m, fsdp)
        optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    stats = ppo.ppo_update(model if fsdp else DDP(model), optimizer, batch, args, PAD, data[f"orders{rank}"])
    metrics = ppo.update_metrics(batch, stats, EOS)
    state = full_model_state(model)  # a collective under FSDP
    if rank == 0:
        torch.save({"state": state, "metrics": metrics}, Path(folder) / "ddp.pt")
    cleanup_distributed()


def _gathered_generation_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    whole = load_pretrained(CausalLM, str(Path(folder) / "policy"))
    sharded = load_pretrained(CausalLM, str(Path(folder) / "policy"))
    shard_model(sharded, "full_shard auto_wrap")  # many units, each gathered once
    queries = torch.tensor([[PAD, 5, 6], [7, 8, 9]])
    steps = 3 + 4 * rank  # the ranks stop at different steps: a forward that communicated would hang
    with gathered_weights(sharded, "full_shard auto_wrap"):
        ours = generate(sharded, queries, PAD, steps, temperature=1e-10)  # greedy
    reference = generate(whole, queries, PAD, steps, temperature=1e-10)
    sharded(queries.masked_fill(queries == PAD, 0)).sum().backward()  # sharded again: training works as before
    torch.save({"equal": torch.equal(ours.query_responses, reference.query_responses),
                "sharded_grad": isinstance(sharded.lm_head.weight.grad, DTensor)}, Path(folder) / f"gen{rank}.pt")
    cleanup_distributed()


@pytest.mark.slow
def test_fsdp_sampling_gathers_the_policy(tiny_models, tmp_path):
    """Under FSDP, sampling runs on the whole, gathered policy: the same tokens as an unsharded copy, ranks stopping
    at different steps without waiting for each other, and the model sharded again afterwards."""
    os.symlink(tiny_models / "policy", tmp_path / "policy")
    run_two_ranks(_gathered_generation_worker, str(tmp_path))
    for rank in range(2):
        assert torch.load(tmp_path / f"gen{rank}.pt") == {"equal": True, "sharded_grad": True}


def ddp_setup(folder: str, rollouts: dict, args: ppo.PPOConfig):
    """Float64 models from the tiny folders and the post-processed rollouts (one rank's, or both concatenated)."""
    load = dict(dtype=torch.float64)
    policy = load_pretrained(CausalLM, str(Path(folder) / "policy"), **load)
    value_model = load_pretrained(RewardModel, str(Path(folder) / "reward"), **load)
    reward_model = load_pretrained(RewardModel, str(Path(folder) / "reward"), **load).eval()
    model = PolicyAndValue(policy, value_model).train()
    optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
    halves = rollouts if isinstance(rollouts, list) else [rollouts]
    batches = [ppo.compute_advantages(rollout.score_responses(
        policy, value_model, reward_model, r["queries"], r["query_responses"], r["logprobs"], args, PAD, EOS),
        args, EOS) for r in halves]  # post-processing is per rank, as in TRL
    return model, optimizer, {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [None, "full_shard", "full_shard auto_wrap"])
def test_two_ranks_match_one_process(tiny_models, tmp_path, fsdp):
    # Each rank holds 4 rollouts (per_device 2, GA 2) in 2 minibatches, one micro-batch each. One process with the
    # 8 rollouts, GA 4 and minibatches made of one minibatch from each rank steps on the same mean gradient.
    args = our_config(response_length=5)
    policy = load_pretrained(CausalLM, str(tiny_models / "policy"), dtype=torch.float64)
    data = {}
    for rank in range(2):
        torch.manual_seed(100 + rank)
        queries = torch.randint(3, 96, (4, 3))
        queries[0, 0] = PAD
        query_responses, logprobs = rollout.sample_responses(policy, queries, args, PAD, EOS)
        data[rank] = {"queries": queries, "query_responses": query_responses, "logprobs": logprobs}
        data[f"orders{rank}"] = [torch.randperm(4) for _ in range(args.num_ppo_epochs)]
    for name in ("policy", "reward"):
        os.symlink(tiny_models / name, tmp_path / name)
    torch.save(data, tmp_path / "rollouts.pt")

    run_two_ranks(_ddp_worker, str(tmp_path), fsdp)
    ddp = torch.load(tmp_path / "ddp.pt")

    single = our_config(per_device_train_batch_size=2, gradient_accumulation_steps=4)
    model, optimizer, batch = ddp_setup(str(tmp_path), [data[0], data[1]], single)
    orders = [torch.cat([data["orders0"][e][k : k + 2], 4 + data["orders1"][e][k : k + 2]])
              for e in range(single.num_ppo_epochs) for k in (0, 2)]
    orders = [torch.cat(orders[2 * e : 2 * e + 2]) for e in range(single.num_ppo_epochs)]
    stats = ppo.ppo_update(model, optimizer, batch, single, PAD, orders)
    theirs_metrics = ppo.update_metrics(batch, stats, EOS)

    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], tensor, rtol=1e-10, atol=1e-10, msg=name)
    for key, value in theirs_metrics.items():
        if key != "val/num_eos_tokens":  # TRL counts rank 0's responses only
            assert ddp["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key  # fp32 rollout logprobs
