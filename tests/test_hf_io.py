"""Loading and saving Hugging Face checkpoints: round trips both ways (sharded too), the new score head, the Hub
cache, gradient checkpointing, and the errors for bad folders."""

import json
import re

import pytest
import torch
import transformers
from tiny import FAMILIES, VOCAB, hf_model

from minirlhf import CausalLM, RewardModel
from minirlhf.infra.hf import load_pretrained, save_pretrained

TOL = dict(rtol=1e-5, atol=1e-5)
IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["causal", "seq_cls"])
def test_ours_to_transformers_strict(family, head, tmp_path):
    """ours -> save_pretrained -> transformers loads with no missing/unexpected keys -> equal outputs."""
    theirs_source = hf_model(family, head=head, pad_token_id=0)
    theirs_source.save_pretrained(tmp_path / "src")
    cls = CausalLM if head == "causal" else RewardModel
    ours_model = load_pretrained(cls, str(tmp_path / "src")).eval()
    save_pretrained(ours_model, str(tmp_path / "ours"))

    auto = transformers.AutoModelForCausalLM if head == "causal" else transformers.AutoModelForSequenceClassification
    theirs_model, info = auto.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager",
                                              output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    theirs_out = theirs_model.eval()(input_ids=IDS).logits
    torch.testing.assert_close(ours_model(IDS), theirs_out, **TOL)
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == family and config["pad_token_id"] == 0
    if head == "seq_cls":
        assert config["architectures"][0].endswith("ForSequenceClassification")
        assert config["id2label"] == {"0": "LABEL_0"} and theirs_model.config.num_labels == 1


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_sharded_both_ways(family, tmp_path):
    theirs_model = hf_model(family)
    theirs_model.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    ours_model = load_pretrained(CausalLM, str(tmp_path / "theirs")).eval()
    torch.testing.assert_close(ours_model(IDS), theirs_model(input_ids=IDS).logits, **TOL)

    save_pretrained(ours_model, str(tmp_path / "ours"), max_shard_size=20_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), attn_implementation="eager")
    torch.testing.assert_close(reloaded.eval()(input_ids=IDS).logits, theirs_model(input_ids=IDS).logits, **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_new_score_head_matches_transformers_seeded_init(family, tmp_path):
    """A causal LM loaded as a reward model gets score ~ N(0, initializer_range), the same draw as transformers."""
    hf_model(family).save_pretrained(tmp_path)
    transformers.set_seed(7)
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path), num_labels=1)
    torch.manual_seed(7)
    ours_model = load_pretrained(RewardModel, str(tmp_path))
    assert ours_model.cfg.num_labels == 1
    torch.testing.assert_close(ours_model.score.weight, theirs_model.score.weight, rtol=0, atol=0)


def test_gradient_checkpointing_is_exact(tmp_path):
    hf_model("llama", head="seq_cls", pad_token_id=0).save_pretrained(tmp_path)
    results = []
    for checkpointing in (False, True):
        model = load_pretrained(RewardModel, str(tmp_path)).train()
        model.transformer.gradient_checkpointing = checkpointing
        loss = model(IDS).square().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=0, atol=0, msg=name)


def test_hub_id_resolves_from_offline_cache(tmp_path, monkeypatch):
    """A Hub id resolves through huggingface_hub's cache layout with HF_HUB_OFFLINE=1, no network."""
    snapshot = tmp_path / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    theirs_model = hf_model("llama")
    theirs_model.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    ours_model = load_pretrained(CausalLM, "tiny-org/tiny-llama").eval()
    torch.testing.assert_close(ours_model(IDS), theirs_model(input_ids=IDS).logits, **TOL)


def test_folder_without_weights_is_initialised_randomly(tmp_path, capsys):
    hf_model("llama").config.save_pretrained(tmp_path)
    model = load_pretrained(CausalLM, str(tmp_path), new_model=True)
    assert "no weights" in capsys.readouterr().out
    std = model.transformer.embed.weight.std().item()
    assert abs(std - 0.02) < 0.005  # N(0, initializer_range)


# ---- bad input: one clear error naming the file or tensor


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(CausalLM, str(tmp_path))


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'bert'"):
        load_pretrained(CausalLM, str(tmp_path))


def test_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_pretrained(CausalLM, str(tmp_path))


def test_wrong_shape(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \(48, 32\)"):
        load_pretrained(CausalLM, str(tmp_path))


def test_unexpected_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors \['model\.layers\.0\.extra\.weight'\]"):
        load_pretrained(CausalLM, str(tmp_path))


def test_corrupt_safetensors(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file"):
        load_pretrained(CausalLM, str(tmp_path))


def test_missing_paths_and_hub_ids_are_one_line_errors(tmp_path, monkeypatch):
    """A path that does not exist never becomes a Hub request; a Hub id that cannot be fetched offline says so."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # relative names resolve here, whatever runs/ the checkout holds
    made_by = {"./runs/sft": "; `python -m minirlhf.sft configs/sft.toml` makes it"}  # the README pipeline's folder
    for name in (str(tmp_path / "missing"), "./runs/sft", "runs/sft/checkpoint-3", "model.safetensors"):
        expected = f"{name}: no such file or folder{made_by.get(name, '')}"
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            load_pretrained(CausalLM, name)
    with pytest.raises(ValueError) as e:
        load_pretrained(CausalLM, "tiny-org/not-cached")
    assert "not found on the Hugging Face Hub" in str(e.value) and len(str(e.value).splitlines()) == 1
