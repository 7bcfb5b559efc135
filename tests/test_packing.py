"""Padding-free (packed) forwards equal padded forwards: log-probs, entropies, values, rewards and parameter gradients,
fp32.

The reference is the plain model with the same weights run on the padded batch (itself checked against
transformers in test_model_parity.py); packing must change which arithmetic is done, never a result.
"""

import pytest
import torch
from helpers import rollout_rows
from tiny import FAMILIES, VOCAB, hf_model

from minirlhf import CausalLM, RewardModel
from minirlhf.data import collate_preference
from minirlhf.infra import packing as packing_module
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.packing import (
    PaddingFreeCausalLM,
    PaddingFreeRewardModel,
    last_columns,
    pack,
    shared_prefix_lengths,
)
from minirlhf.losses import reward_loss
from minirlhf.model import last_non_pad, model_inputs

TOL = dict(rtol=1e-5, atol=1e-5)
PAD = 0


@pytest.fixture(autouse=True)
def always_pack(monkeypatch):
    """These tests compare the packed forward with the padded one, so they pack whatever the padding."""
    monkeypatch.setattr(packing_module, "PACK_WHEN_SAVING", 0.0)


def load_ours(cls, family, tmp_path, **overrides):
    """The plain model and its padding-free twin (infra/packing.py), with the same weights."""
    packed_cls = PaddingFreeCausalLM if cls is CausalLM else PaddingFreeRewardModel
    theirs = hf_model(family, head="causal" if cls is CausalLM else "seq_cls", **overrides)
    theirs.save_pretrained(tmp_path / family)
    return (load_pretrained(cls, str(tmp_path / family)).eval(),
            load_pretrained(packed_cls, str(tmp_path / family)).eval())


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, reference):
    """rtol 1e-5, atol 1e-5 of the largest gradient entry: a token's gradient sums its cells' in another order, and
    some gradients are zero but for rounding (a key bias shifts every score of a row alike)."""
    assert set(ours) == set(reference) and reference
    scale = max(float(grad.abs().max()) for grad in reference.values())
    for name, grad in reference.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


SHAPES = {
    # query lengths, response lengths (a 1-token sequence, an empty response, full rows)
    "mixed": ([6, 1, 3, 6], [8, 0, 3, 1]),
    "one long, many short": ([6, 1, 1, 2, 1, 1], [30, 1, 0, 2, 1, 1]),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rollout_packing_equals_padded(family, shape, tmp_path):
    """The policy's log-probs of the responses and entropies, and values, from the last query token on, pads after
    each response included (TRL uses the value after the last token, and averages entropy over every position), and
    the gradients of a loss on them."""
    query_lengths, response_lengths = SHAPES[shape]
    context_length, response_length = max(query_lengths), max(response_lengths)
    rows = rollout_rows(query_lengths, response_lengths, context_length, response_length)
    inputs = model_inputs(rows, PAD)
    keep = response_length + 1
    assert len(pack(inputs[1], last_columns(inputs[1], keep)).dst) < rows.numel()  # it does skip work
    for cls in (CausalLM, RewardModel):
        outputs = {}
        for name, model in zip(("padded", "packed"), load_ours(cls, family, tmp_path), strict=True):
            if cls is CausalLM:
                out, entropy = model(*inputs, targets=inputs[0][:, context_length:], temperature=0.7,
                                     with_entropy=True)  # (B, T) each
            else:
                out, entropy = model.token_scores(*inputs, scores_to_keep=keep), torch.zeros(())  # (B, keep, 1)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            (out * weights).sum().backward()
            outputs[name] = (out.detach(), entropy, grads(model))
        torch.testing.assert_close(outputs["packed"][0], outputs["padded"][0], **TOL)
        torch.testing.assert_close(outputs["packed"][1], outputs["padded"][1], **TOL)
        assert_same_grads(outputs["packed"][2], outputs["padded"][2])


def preference_pairs(seed=0):
    """Chosen/rejected id lists: a shared prompt of varied length, identical sides, one side a prefix of the other,
    nothing shared, and 1-token sides."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    prompt = ids(7)
    return [
        (prompt + ids(5), prompt + ids(9)),
        (prompt[:3] + ids(2), prompt[:3] + ids(1)),
        (prompt, prompt),
        (prompt, prompt + ids(4)),
        (ids(6), ids(3)),
        (ids(1), ids(1)),
    ]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_shared_prefix_reward_equals_padded(family, pad_is_eos, tmp_path):
    """Rewards, the Bradley-Terry loss (with margin and centring) and its gradients, with the prompt run once."""
    pad_id = 2 if pad_is_eos else PAD  # eos is 2 in the tiny configs; pad == eos pools before the trailing EOS
    padded, packed = load_ours(RewardModel, family, tmp_path, pad_token_id=pad_id)
    pairs = preference_pairs()
    if pad_is_eos:
        pairs = [(c + [2], r + [2]) for c, r in pairs]
    examples = [{"chosen_ids": c, "rejected_ids": r} for c, r in pairs]
    batch = collate_preference(examples, pad_id)
    prefix = torch.tensor([common_prefix_length(c, r) for c, r in pairs])
    assert torch.equal(shared_prefix_lengths(batch["input_ids"], batch["attention_mask"]), prefix)
    margin = torch.linspace(-1, 1, len(pairs))
    results = {}
    for name, model, shared in (("padded", padded, False), ("plain", packed, False), ("shared", packed, True)):
        model.zero_grad()
        model.shared_prefix = shared
        rewards = model(batch["input_ids"], batch["attention_mask"]).squeeze(-1)
        loss = reward_loss(*rewards.chunk(2), margin, center_rewards_coefficient=0.01)
        loss.backward()
        results[name] = (rewards.detach(), loss.detach(), grads(model))
    n_real = int(batch["attention_mask"].sum())
    pooled = last_non_pad(batch["input_ids"], pad_id)
    used = torch.nn.functional.one_hot(pooled, batch["input_ids"].shape[1])
    assert len(pack(batch["attention_mask"], used, pair_prefix_lengths=prefix).dst) == n_real - int(prefix.sum())
    for name in ("plain", "shared"):
        torch.testing.assert_close(results[name][0], results["padded"][0], **TOL)
        torch.testing.assert_close(results[name][1], results["padded"][1], **TOL)
        assert_same_grads(results[name][2], results["padded"][2])


def test_pack_layout_by_hand():
    """Which cells become tokens, worked out by hand for a 2-row PPO batch (context 3)."""
    mask = torch.tensor([[0, 1, 1, 1, 0, 0],    # left pad, query 2, response 1, then two pads (one token for both)
                         [1, 1, 1, 1, 1, 1]])   # a full row
    packing = pack(mask, used=(torch.arange(6) >= 2).expand(2, 6))
    assert packing.dst.tolist() == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert packing.src.tolist() == [[0, 0, 1, 2, 3, 3], [4, 5, 6, 7, 8, 9]]
    assert packing.kept.tolist() == [1, 2, 3, 6, 7, 8, 9]  # the last layer skips the first query tokens
    shared = pack(torch.ones(2, 4, dtype=torch.long), pair_prefix_lengths=torch.tensor([3]))
    assert shared.src.tolist() == [[0, 1, 2, 3], [0, 1, 2, 4]]


def test_little_padding_runs_the_plain_forward(tmp_path, monkeypatch):
    """Where packing would skip less than PACK_WHEN_SAVING of the cells, the twins run the plain forward (the
    gathers and the row-by-row attention would cost more than they save); with much padding they pack."""
    monkeypatch.setattr(packing_module, "PACK_WHEN_SAVING", 0.1)
    plain, packed = load_ours(CausalLM, "llama", tmp_path)
    calls = []
    trunk = packing_module.packed_trunk
    monkeypatch.setattr(packing_module, "packed_trunk", lambda *args: calls.append(1) or trunk(*args))
    for query_lengths, expect_packed in (([6, 6, 6, 5], False), ([6, 1, 1, 2], True)):
        rows = rollout_rows(query_lengths, [4, 4, 4, 4], context_length=6, response_length=4)
        inputs, targets = model_inputs(rows, PAD), rows[:, 6:]
        calls.clear()
        ours = packed(*inputs, targets=targets)[0]
        assert bool(calls) == expect_packed
        torch.testing.assert_close(ours, plain(*inputs, targets=targets)[0], **TOL)
