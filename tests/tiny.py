"""Tiny random Hugging Face models of every supported family, built on the fly (no downloads).

Used by the parity tests as the independent reference: `theirs_*` objects come from transformers, built here.
"""

import transformers

VOCAB = 96
FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "mistral"]


def hf_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A 2-layer config of `family`, hidden 32, 4 heads (2 key/value heads where the family has GQA)."""
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)
        return transformers.GPT2Config(**{**kw, **overrides})
    if family == "gpt_neox":
        kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, rotary_pct=0.5, **ids)
        return transformers.GPTNeoXConfig(**{**kw, **overrides})
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, rms_norm_eps=1e-5, **ids)
    if family == "llama":
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 500.0}
        return transformers.LlamaConfig(**{**kw, **overrides})
    if family == "qwen2":
        return transformers.Qwen2Config(**{**kw, "tie_word_embeddings": True, **overrides})
    if family == "qwen3":
        return transformers.Qwen3Config(**{**kw, "head_dim": 16, **overrides})
    if family == "mistral":
        return transformers.MistralConfig(**{**kw, "sliding_window": 5, **overrides})
    raise ValueError(family)


def hf_model(family: str, head: str = "causal", **overrides):
    """A random transformers model in eval mode with eager attention; head is "causal" or "seq_cls"."""
    cfg = hf_config(family, **overrides)
    cls = transformers.AutoModelForCausalLM if head == "causal" else transformers.AutoModelForSequenceClassification
    if head == "seq_cls":
        cfg.num_labels = 1
    model = cls.from_config(cfg, attn_implementation="eager")
    return model.eval()
