"""Our models vs transformers (fp32, CPU, eager attention): logits, pooled rewards and gradients of every family.

Each test saves a random transformers model with `save_pretrained`, loads it with our `load_pretrained`, and
compares on the positions that are real tokens (what pad positions compute is never used by either side).
"""

import pytest
import torch
from tiny import FAMILIES, VOCAB, hf_model

from minirlhf import CausalLM, RewardModel
from minirlhf.infra.hf import load_pretrained, to_hf_tensors

TOL = dict(rtol=1e-5, atol=1e-5)


def batch(padding: str, pad_id: int, B: int = 3, T: int = 10, seed: int = 0):
    """Random ids with rows of different lengths, padded on `padding` side with pad_id; no pad id inside text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    lengths = torch.tensor([T, T - 3, T - 6][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    if padding == "left":
        mask = mask.flip(-1)
    ids[~mask] = pad_id
    return ids, mask.long()


def position_ids_for(mask):
    return (mask.cumsum(-1) - mask).clamp(min=0)  # TRL's positions for left padding: first real token at 0


def load_ours(cls, theirs, tmp_path):
    theirs.save_pretrained(tmp_path / "theirs")
    return load_pretrained(cls, str(tmp_path / "theirs")).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_causal_logits_and_grads(family, padding, tmp_path):
    theirs_model = hf_model(family)
    ours_model = load_ours(CausalLM, theirs_model, tmp_path)
    ids, mask = batch(padding, pad_id=0)
    pos = position_ids_for(mask)

    theirs_logits = theirs_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ours_logits = ours_model(ids, mask, pos)
    real = mask.bool()
    torch.testing.assert_close(ours_logits[real], theirs_logits[real], **TOL)

    weights = torch.randn_like(ours_logits) * real[..., None]  # a scalar loss over real positions only
    (theirs_logits * weights).sum().backward()
    (ours_logits * weights).sum().backward()
    ours_grads = to_hf_tensors(ours_model.cfg, {n: p.grad for n, p in ours_model.named_parameters()})
    if family == "gpt_neox":
        ours_grads["embed_out.weight"] = ours_grads.pop("lm_head.weight")
    theirs_grads = {n: p.grad for n, p in theirs_model.named_parameters()}
    if family == "gpt_neox":
        theirs_grads["embed_out.weight"] = theirs_grads.pop("lm_head.weight")
    assert set(ours_grads) == set(theirs_grads)
    for name, grad in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, **TOL, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_reward_pooling(family, pad_is_eos, padding, tmp_path):
    pad_id = 2 if pad_is_eos else 0  # eos_token_id is 2 in the tiny configs
    theirs_model = hf_model(family, head="seq_cls", pad_token_id=pad_id)
    ours_model = load_ours(RewardModel, theirs_model, tmp_path)
    ids, mask = batch(padding, pad_id)
    if pad_is_eos:
        ids[0, 4] = 2  # an EOS inside the text is skipped over as padding, like transformers does
        ids[mask.bool() & (torch.arange(ids.shape[1]) == mask.sum(-1, keepdim=True) - 1)] = 2  # trailing EOS
    pos = position_ids_for(mask)
    theirs_rewards = theirs_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    ours_rewards = ours_model(ids, mask, pos)
    assert ours_rewards.shape == (3, 1)
    torch.testing.assert_close(ours_rewards, theirs_rewards, **TOL)


def test_reward_pooling_all_pad_row_and_no_pad_id(tmp_path):
    theirs_model = hf_model("llama", head="seq_cls", pad_token_id=0)
    ours_model = load_ours(RewardModel, theirs_model, tmp_path)
    ids, mask = batch("right", pad_id=0)
    ids[2], mask[2] = 0, 0
    torch.testing.assert_close(ours_model(ids, mask), theirs_model(input_ids=ids, attention_mask=mask).logits, **TOL)
    ours_model.cfg.pad_token_id = None
    with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
        ours_model(ids, mask)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_variants(family, tmp_path):
    """Tied vs untied embeddings, sequential vs parallel residual, Llama 3.1 rope scaling."""
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
        theirs_model = hf_model("llama", tie_word_embeddings=True, rope_parameters=rope)
    else:
        theirs_model = hf_model("gpt_neox", use_parallel_residual=False, tie_word_embeddings=True)
    ours_model = load_ours(CausalLM, theirs_model, tmp_path)
    assert ours_model.lm_head is None
    ids, mask = batch("right", pad_id=0)
    real = mask.bool()
    theirs_logits = theirs_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours_model(ids, mask)[real], theirs_logits[real], **TOL)


def test_transformers_4_config_format(tmp_path):
    """config.json as transformers 4.x wrote it: rope_theta and rope_scaling at top level, torch_dtype."""
    import json

    rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    theirs_model = hf_model("llama", rope_parameters=rope)
    theirs_model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = {**params, "rope_type": "llama3"}
    hf["torch_dtype"] = hf.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    ours_model = load_pretrained(CausalLM, str(tmp_path)).eval()
    ids, _ = batch("right", pad_id=0)
    torch.testing.assert_close(ours_model(ids), theirs_model(input_ids=ids).logits, **TOL)


def test_dropout_rates_read_and_disabled(tmp_path):
    from minirlhf.model import disable_dropout

    ours_model = load_ours(CausalLM, hf_model("gpt2", resid_pdrop=0.3, attn_pdrop=0.2, embd_pdrop=0.1), tmp_path)
    rates = {m.p for m in ours_model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.3, 0.2, 0.1}
    ours_model.train()
    ids, _ = batch("right", pad_id=0)
    assert not torch.equal(ours_model(ids), ours_model(ids))  # dropout active in train mode
    disable_dropout(ours_model)
    torch.testing.assert_close(ours_model(ids), ours_model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_logits_to_keep(family, tmp_path):
    """logits_to_keep=k gives the logits of the last k positions, as transformers' argument of that name."""
    theirs_model = hf_model(family)
    ours_model = load_ours(CausalLM, theirs_model, tmp_path)
    ids, mask = batch("left", pad_id=0)  # left padding: the last positions are real tokens in every row
    pos = position_ids_for(mask)
    ours_logits = ours_model(ids, mask, pos, logits_to_keep=4)
    assert ours_logits.shape == (3, 4, VOCAB)
    theirs_logits = theirs_model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=4).logits
    torch.testing.assert_close(ours_logits, theirs_logits, **TOL)
    torch.testing.assert_close(ours_logits, ours_model(ids, mask, pos)[:, -4:], rtol=0, atol=0)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3"])
def test_cpu_bf16_autocast_tracks_fp32(family, tmp_path):
    """Under CPU bf16 autocast (projections in bf16, attention in fp32) logits and every gradient stay within bf16
    rounding of transformers in fp32. bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation),
    so a few layers of it give ~1% relative error: the bound is 3%; a wrong mask or rotary would be off by ~100%."""
    theirs_model = hf_model(family)
    ours_model = load_ours(CausalLM, theirs_model, tmp_path)
    ids, mask = batch("left", pad_id=0)
    pos = position_ids_for(mask)
    real = mask.bool()
    theirs_logits = theirs_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_logits = ours_model(ids, mask, pos)
    assert ours_logits.dtype == torch.bfloat16
    assert relative_error(ours_logits[real], theirs_logits[real]) < 0.03

    weights = torch.randn(theirs_logits.shape) * real[..., None]
    (theirs_logits * weights).sum().backward()
    (ours_logits.float() * weights).sum().backward()
    ours_grads = to_hf_tensors(ours_model.cfg, {n: p.grad for n, p in ours_model.named_parameters()})
    for name, theirs_param in theirs_model.named_parameters():
        assert ours_grads[name].dtype == torch.float32  # fp32 master weights get fp32 gradients
        assert relative_error(ours_grads[name], theirs_param.grad) < 0.03, name
