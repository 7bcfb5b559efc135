"""Log-probabilities and entropies without the (B, T, vocab) logits (losses.chunked_logprobs) equal the full-logits
path they replace, in values and gradients (fp32, 1e-6): TRL's formulas (logprobs_from_logits, entropy_from_logits,
themselves checked against TRL in test_losses.py) applied to the whole logits F.linear(h, W).float() / temperature.

Checked on the pure function, through CausalLM.forward(targets=...) and its padding-free twin (PPO batches with
pads), in SFT's loss, in a PPO update, and with two gloo ranks under DDP and FSDP2. The chunks are made small here
(LOGITS_PER_CHUNK patched) so that every path runs several of them, a token count the chunk does not divide and a
prime vocabulary, and so that checkpoint recomputes each chunk in backward. A dispatch mode that sees every op,
backward included, checks that no tensor holds more than one chunk's logits.
"""

import functools
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import rollout_rows, run_two_ranks
from tiny import FAMILIES, VOCAB, hf_model
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minirlhf import losses, ppo, rollout
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.packing import PaddingFreeCausalLM, PaddingFreeRewardModel
from minirlhf.infra.parallel import cleanup_distributed, full_tensor, shard_model
from minirlhf.losses import (
    INVALID_LOGPROB,
    chunked_logprobs,
    completion_loss,
    entropy_from_logits,
    gather_index,
    logprobs_from_logits,
)
from minirlhf.model import CausalLM, PolicyAndValue, RewardModel, model_inputs
from minirlhf.optim import AdamW, param_groups

EXACT = dict(rtol=1e-6, atol=1e-6)
PAD = 0
TEMPERATURE = 0.7 + 1e-7  # as PPO passes it


class LargestLogits(TorchDispatchMode):
    """Records the most elements any op's output holds in logits-shaped tensors (..., tokens, vocab), in forward and
    backward alike; (hidden, vocab) is the head's weight and its gradient, transposed."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab and (
                    t.shape[-2] != self.hidden):
                self.largest = max(self.largest, t.numel())
        return out


def full_logits_path(h, weight, targets, temperature):
    """Today's path in TRL and before chunked_logprobs: the whole logits, then the two formulas."""
    logits = F.linear(h, weight).float() / temperature
    return logprobs_from_logits(logits, targets), entropy_from_logits(logits)


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------------------------------
# The function


@pytest.mark.parametrize("rows_per_pass", [2, 1000])  # LogSoftmaxAtTargets' row blocks: several (the last short), one
@pytest.mark.parametrize("tokens_per_chunk", [1, 5, 21, 1000])  # 21 tokens: 21 chunks, 5 (the last short), 1, 1
def test_chunked_equals_full_logits(monkeypatch, tokens_per_chunk, rows_per_pass):
    V, H = 97, 8  # a prime vocabulary: no chunk divides it
    monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", tokens_per_chunk * V + V // 2)  # and V does not divide this
    monkeypatch.setattr(losses, "LOGITS_PER_PASS", rows_per_pass * V + V // 2)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()  # logits of order 1, as a trained head's
    targets = torch.randint(0, V, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g)
    results = {}
    chunked = functools.partial(chunked_logprobs, with_entropy=True)
    for name, fn in (("chunked", chunked), ("full", full_logits_path)):
        with LargestLogits(V, H) as seen:
            logprobs, entropy = fn(h, weight, targets, TEMPERATURE)
            (logprobs * upstream).sum().backward()
        results[name] = (logprobs.detach(), entropy.detach(), h.grad.clone(), weight.grad.clone(), seen.largest)
        h.grad = weight.grad = None
        assert logprobs.shape == entropy.shape == (3, 7)
    for i, what in enumerate(("logprobs", "entropy", "grad h", "grad weight")):
        torch.testing.assert_close(results["chunked"][i], results["full"][i], **EXACT, msg=what)
    assert results["chunked"][4] <= min(tokens_per_chunk, 21) * V  # one chunk of logits at most, backward too
    assert results["full"][4] == 21 * V  # (the check sees the whole logits where they are made)


def test_only_the_log_probs_carry_gradients_and_entropy_is_optional(monkeypatch):
    monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", 2 * 11)  # 2 chunks of 2 tokens
    h, weight = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    logprobs, entropy = chunked_logprobs(h, weight, torch.arange(4), 1.0, with_entropy=True)
    assert logprobs.requires_grad and not entropy.requires_grad
    alone, none = chunked_logprobs(h, weight, torch.arange(4), 1.0)  # scoring and SFT need no entropy
    assert none is None and torch.equal(alone, logprobs)
    with torch.no_grad():
        assert not chunked_logprobs(h, weight, torch.arange(4), 1.0)[0].requires_grad
    empty = chunked_logprobs(h[:0], weight, torch.arange(0), 1.0, with_entropy=True)  # a 1-token SFT batch
    assert empty[0].shape == empty[1].shape == (0,)


def test_bf16_autocast_takes_the_same_bf16_logits():
    """Under autocast the projection runs in bf16 and is upcast, in chunks as in the whole. The reference takes the
    same bf16 logits in float64: entropies of peaked rows are a difference of two large terms, which fp32 rounds
    differently in each formula (~3e-6 apart), so both are held to the exact value."""
    g = torch.Generator().manual_seed(1)
    h, weight, targets = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g), torch.arange(18) % 50
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_logprobs(h, weight, targets.view(2, 9), TEMPERATURE, with_entropy=True)
        logits = F.linear(h, weight)
    assert logits.dtype == torch.bfloat16
    logits = logits.double() / TEMPERATURE
    theirs = logprobs_from_logits(logits, targets.view(2, 9)), entropy_from_logits(logits)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, **EXACT)


# ---------------------------------------------------------------------------------------------------------------------
# Through the models: PPO batches with pads (plain and padding-free), SFT's loss


@pytest.fixture
def small_chunks(monkeypatch):
    """3 tokens per chunk at the tiny models' 96-token vocabulary, so every forward below makes several chunks, and
    2 rows per block of LogSoftmaxAtTargets' passes."""
    monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", 3 * VOCAB + 7)
    monkeypatch.setattr(losses, "LOGITS_PER_PASS", 2 * VOCAB + 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_log_probs_equal_the_full_logits_path(family, tmp_path, small_chunks):
    """CausalLM.forward(targets=...) and the padding-free twin on a PPO batch (pads after the responses, an empty
    response) vs the logits of the plain forward, / temperature, and the two formulas: log-probs (at INVALID_LOGPROB
    where PPO masks them), entropies (averaged over every position, pads too, as TRL) and every parameter's
    gradient."""
    hf_model(family).save_pretrained(tmp_path / family)
    rows = rollout_rows([4, 1, 2], [6, 0, 3], context_length=4, response_length=6)
    inputs, responses = model_inputs(rows, PAD), rows[:, 4:]
    targets, padding_mask = gather_index(responses, PAD), responses == PAD
    upstream = torch.randn(responses.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, cls in (("full", CausalLM), ("plain", CausalLM), ("padding-free", PaddingFreeCausalLM)):
        model = load_pretrained(cls, str(tmp_path / family)).eval()  # no dropout, as PPO's models
        with LargestLogits(VOCAB, 32) as seen:
            if name == "full":
                logits = model(*inputs, logits_to_keep=responses.shape[1] + 1)[:, :-1].float() / TEMPERATURE
                logprobs, entropy = logprobs_from_logits(logits, targets), entropy_from_logits(logits).detach()
            else:
                logprobs, entropy = model(*inputs, targets=targets, temperature=TEMPERATURE, with_entropy=True)
            logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
            (logprobs * upstream).sum().backward()
        results[name] = (logprobs.detach(), entropy.detach(), grads(model), seen.largest)
    assert results["full"][3] >= responses.numel() * VOCAB
    for name, tol in (("plain", EXACT), ("padding-free", dict(rtol=1e-5, atol=1e-5))):  # as in test_packing.py
        ours, full = results[name], results["full"]
        torch.testing.assert_close(ours[0], full[0], **tol, msg=f"{name} logprobs")
        torch.testing.assert_close(ours[1], full[1], **tol, msg=f"{name} entropy")
        assert set(ours[2]) == set(full[2])
        for param, grad in full[2].items():
            torch.testing.assert_close(ours[2][param], grad, **tol, msg=f"{name} {param}")
        assert ours[3] <= 3 * VOCAB


def test_sft_loss_equals_cross_entropy_of_the_logits(tmp_path, small_chunks):
    """completion_loss on forward(targets=...) vs F.cross_entropy over the whole logits (transformers'
    ForCausalLMLoss, which test_sft.py checks against TRL's SFTTrainer): value and gradients."""
    hf_model("llama").save_pretrained(tmp_path / "llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    labels = ids.masked_fill(torch.arange(11) < torch.tensor([[4], [2], [7]]), -100)
    losses_and_grads = []
    for full in (True, False):
        model = load_pretrained(CausalLM, str(tmp_path / "llama")).eval()
        if full:
            logits = model(ids).float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / 7
        else:
            logprobs, _ = model(ids, targets=labels[:, 1:].clamp(min=0))
            loss = completion_loss(logprobs, labels, 7)
        loss.backward()
        losses_and_grads.append((loss.detach(), grads(model)))
    (theirs, theirs_grads), (ours, ours_grads) = losses_and_grads
    torch.testing.assert_close(ours, theirs, **EXACT)
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, **EXACT, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# A PPO update, and two ranks


def ppo_args(**overrides) -> ppo.PPOConfig:
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_mini_batches=2, num_ppo_epochs=2,
              local_rollout_forward_batch_size=2, response_length=6, temperature=0.7, stop_token="eos",
              max_grad_norm=0, learning_rate=1e-3, total_episodes=4, num_sample_generations=0)
    args = ppo.PPOConfig(**{**kw, **overrides})
    args.set_runtime_sizes(1, 8)
    return args


def ppo_batch(folder: Path, args, policy_cls=CausalLM, reward_cls=RewardModel, dtype=torch.float32):
    """The models and a post-processed batch of 4 rollouts: responses stopping at EOS (2) or running to the end."""
    policy = load_pretrained(policy_cls, str(folder / "llama"), dtype=dtype)
    value_model = load_pretrained(reward_cls, str(folder / "reward"), dtype=dtype)
    g = torch.Generator().manual_seed(4)
    queries = torch.randint(3, VOCAB, (4, 3), generator=g)
    queries[0, :2] = PAD
    responses = torch.randint(3, VOCAB, (4, 6), generator=g)
    responses[1, 2], responses[2, 0] = 2, 2
    query_responses = torch.cat([queries, responses], 1)
    logprobs = -torch.rand(4, 6, generator=g) - 4
    rollouts = rollout.score_responses(policy, value_model, value_model, queries, query_responses, logprobs, args,
                                       PAD, 2)
    return policy, value_model, ppo.compute_advantages(rollouts, args, 2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    hf_model("llama").save_pretrained(folder / "llama")
    hf_model("llama", head="seq_cls").save_pretrained(folder / "reward")
    return folder


@pytest.mark.parametrize("padding_free", [False, True])
def test_ppo_update_is_the_same_in_chunks(folder, monkeypatch, padding_free):
    """Rollout scoring and a whole update (2 PPO epochs, 2 minibatches, AdamW) with 3-token chunks vs one chunk for
    everything (no recomputation): the same reference log-probs, statistics and weights (fp32, 1e-6). The one-chunk
    path is the full-logits path, as the tests above show, and the TRL parity tests in test_ppo.py run it."""
    classes = (PaddingFreeCausalLM, PaddingFreeRewardModel) if padding_free else (CausalLM, RewardModel)
    args = ppo_args()
    runs = {}
    for per_chunk in (3 * VOCAB, 2**24):
        monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", per_chunk)
        policy, value_model, batch = ppo_batch(folder, args, *classes)
        model = PolicyAndValue(policy, value_model).train()
        optimizer = AdamW(param_groups(model, 0.0), lr=args.learning_rate)
        orders = [torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2])]
        with LargestLogits(VOCAB, 32) as seen:
            stats = ppo.ppo_update(model, optimizer, batch, args, PAD, orders)
        runs[per_chunk] = (batch["ref_logprobs"], stats, model.state_dict(), seen.largest)
    (small, one) = runs[3 * VOCAB], runs[2**24]
    torch.testing.assert_close(small[0], one[0], **EXACT)
    for key, value in one[1].items():
        torch.testing.assert_close(small[1][key], value, **EXACT, msg=key)
    for name, tensor in one[2].items():
        torch.testing.assert_close(small[2][name], tensor, **EXACT, msg=name)
    assert small[3] <= 3 * VOCAB < one[3]


def _two_rank_worker(rank: int, world_size: int, port: int, folder: str, fsdp: str | None) -> None:
    """One forward and backward of PolicyAndValue (the padding-free twins, float64) on this rank's 2 rows, with
    3-token chunks, wrapped as PPO wraps it; saves the whole gradients."""
    torch.set_num_threads(1)
    losses.LOGITS_PER_CHUNK = 3 * VOCAB
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    data = torch.load(Path(folder) / "batch.pt")
    model = PolicyAndValue(*(load_pretrained(cls, str(Path(folder) / name), dtype=torch.float64) for cls, name in
                             ((PaddingFreeCausalLM, "llama"), (PaddingFreeRewardModel, "reward")))).train()
    if fsdp:
        for m in (model.policy, model.value_model):
            shard_model(m, fsdp)
    train_model = model if fsdp else DDP(model)  # held until backward is done: its reducer averages the gradients
    two_rank_loss(train_model, data, slice(2 * rank, 2 * rank + 2)).backward()
    grads = {name: full_tensor(p.grad) for name, p in model.named_parameters()}  # collectives under FSDP
    if rank == 0:
        torch.save(grads, Path(folder) / "grads.pt")
    cleanup_distributed()


def two_rank_loss(model, data: dict, rows: slice) -> torch.Tensor:
    query_responses, upstream = data["query_responses"][rows], data["upstream"][rows]
    responses = query_responses[:, 3:]
    logprobs, entropy, values = model(*model_inputs(query_responses, PAD), targets=gather_index(responses, PAD),
                                      temperature=TEMPERATURE)
    return (logprobs * upstream).sum() + (values * upstream).sum() + 0 * entropy.sum()


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [None, "full_shard", "full_shard auto_wrap"])
def test_two_ranks_recompute_chunks_like_one_process(folder, tmp_path, monkeypatch, fsdp):
    """Under DDP (PolicyAndValue wrapped, as PPO does) and FSDP2 (policy and value model sharded, lm_head in the
    root unit gathered only inside its forward), each chunk's recomputation in backward happens inside the wrapped
    module's backward: the gradients equal one process's on the 4 rows (fp64, 1e-10)."""
    g = torch.Generator().manual_seed(5)
    query_responses = torch.randint(3, VOCAB, (4, 9), generator=g)
    query_responses[0, :2], query_responses[1, 6:], query_responses[3, 3:] = PAD, PAD, PAD  # empty response
    data = {"query_responses": query_responses, "upstream": torch.randn(4, 6, generator=g, dtype=torch.float64)}
    torch.save(data, tmp_path / "batch.pt")
    for name in ("llama", "reward"):
        os.symlink(folder / name, tmp_path / name)
    run_two_ranks(_two_rank_worker, str(tmp_path), fsdp)
    ranks = torch.load(tmp_path / "grads.pt")

    monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", 3 * VOCAB)
    model = PolicyAndValue(*(load_pretrained(cls, str(folder / name), dtype=torch.float64) for cls, name in
                             ((PaddingFreeCausalLM, "llama"), (PaddingFreeRewardModel, "reward")))).train()
    (two_rank_loss(model, data, slice(0, 4)) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[name], p.grad, rtol=1e-10, atol=1e-10, msg=name)
