"""Hugging Face checkpoints in and out: config.json -> ModelConfig, safetensors names -> our module names.

Loading reads `config.json` (as transformers 4.x and 5.x write it) and `model.safetensors` or the shards listed in
`model.safetensors.index.json`, from a local folder or a Hub id (`hub.local_or_hub`, which honours HF_HUB_OFFLINE and
the cache). Each family has one literal table from our module names to Hugging Face's, with
`{}` for the layer index (litgpt's convert_hf_checkpoint style), plus two named surgeries: GPT-2 stores its
projections as Conv1D (transposed), and GPT-2 and GPT-NeoX fuse q, k and v into one tensor (NeoX per head).
Saving inverts the same tables, so transformers loads what we write with no missing or unexpected keys.
"""

import contextlib
import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from minirlhf.infra.files import local_or_hub
from minirlhf.infra.parallel import print0
from minirlhf.model import CausalLM, ModelConfig, RewardModel, RMSNorm, rope_inv_freq

# Backbone prefix and architecture name stem of each family (transformers' base_model_prefix and class names).
PREFIX = {"gpt2": "transformer", "gpt_neox": "gpt_neox", "llama": "model", "qwen2": "model", "qwen3": "model",
          "mistral": "model"}
ARCH = {"gpt2": "GPT2", "gpt_neox": "GPTNeoX", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3",
        "mistral": "Mistral"}

GPT2_NAMES = {
    "embed": "wte",
    "pos_embed": "wpe",
    "blocks.{}.attn_norm": "h.{}.ln_1",
    "blocks.{}.attn.q_proj": "h.{}.attn.c_attn",  # fused with k and v (surgery below)
    "blocks.{}.attn.k_proj": "h.{}.attn.c_attn",
    "blocks.{}.attn.v_proj": "h.{}.attn.c_attn",
    "blocks.{}.attn.o_proj": "h.{}.attn.c_proj",
    "blocks.{}.mlp_norm": "h.{}.ln_2",
    "blocks.{}.mlp.up_proj": "h.{}.mlp.c_fc",
    "blocks.{}.mlp.down_proj": "h.{}.mlp.c_proj",
    "final_norm": "ln_f",
}
NEOX_NAMES = {
    "embed": "embed_in",
    "blocks.{}.attn_norm": "layers.{}.input_layernorm",
    "blocks.{}.attn.q_proj": "layers.{}.attention.query_key_value",  # fused per head (surgery below)
    "blocks.{}.attn.k_proj": "layers.{}.attention.query_key_value",
    "blocks.{}.attn.v_proj": "layers.{}.attention.query_key_value",
    "blocks.{}.attn.o_proj": "layers.{}.attention.dense",
    "blocks.{}.mlp_norm": "layers.{}.post_attention_layernorm",
    "blocks.{}.mlp.up_proj": "layers.{}.mlp.dense_h_to_4h",
    "blocks.{}.mlp.down_proj": "layers.{}.mlp.dense_4h_to_h",
    "final_norm": "final_layer_norm",
}
LLAMA_NAMES = {  # also Qwen2, Qwen3 and Mistral
    "embed": "embed_tokens",
    "blocks.{}.attn_norm": "layers.{}.input_layernorm",
    "blocks.{}.attn.q_proj": "layers.{}.self_attn.q_proj",
    "blocks.{}.attn.k_proj": "layers.{}.self_attn.k_proj",
    "blocks.{}.attn.v_proj": "layers.{}.self_attn.v_proj",
    "blocks.{}.attn.o_proj": "layers.{}.self_attn.o_proj",
    "blocks.{}.attn.q_norm": "layers.{}.self_attn.q_norm",
    "blocks.{}.attn.k_norm": "layers.{}.self_attn.k_norm",
    "blocks.{}.mlp_norm": "layers.{}.post_attention_layernorm",
    "blocks.{}.mlp.gate_proj": "layers.{}.mlp.gate_proj",
    "blocks.{}.mlp.up_proj": "layers.{}.mlp.up_proj",
    "blocks.{}.mlp.down_proj": "layers.{}.mlp.down_proj",
    "final_norm": "norm",
}
NAMES = {"gpt2": GPT2_NAMES, "gpt_neox": NEOX_NAMES, "llama": LLAMA_NAMES, "qwen2": LLAMA_NAMES,
         "qwen3": LLAMA_NAMES, "mistral": LLAMA_NAMES}
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


# ----------------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a transformers config.json dict into a ModelConfig, with each family's transformers defaults."""
    t = hf.get("model_type")
    if t not in NAMES:
        raise ValueError(f"{source}: unsupported model_type {t!r}; minirlhf supports {', '.join(NAMES)}")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # 5.x writes the first, 4.x the second
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"{source}: unsupported rope type {rope_type!r}; minirlhf supports 'default' and 'llama3'")
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = {k: rope[k] for k in ("factor", "low_freq_factor", "high_freq_factor")}
        rope_scaling["original_max_position_embeddings"] = rope.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
    common = dict(model_type=t, vocab_size=hf["vocab_size"], initializer_range=hf.get("initializer_range", 0.02),
                  pad_token_id=hf.get("pad_token_id"), num_labels=len(hf.get("id2label") or {0: 0}), hf_config=hf)

    if t == "gpt2":
        d, n = hf.get("n_embd", 768), hf.get("n_layer", 12)
        return ModelConfig(
            **common, hidden_size=d, num_layers=n, num_heads=hf.get("n_head", 12), num_kv_heads=hf.get("n_head", 12),
            head_dim=d // hf.get("n_head", 12), intermediate_size=hf.get("n_inner") or 4 * d,
            max_position_embeddings=hf.get("n_positions", 1024), norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned", mlp="plain",
            hidden_act=hf.get("activation_function", "gelu_new"), qkv_bias=True, o_bias=True, mlp_bias=True,
            sliding_windows=[None] * n, attn_scale_by_layer=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True), embd_dropout=hf.get("embd_pdrop", 0.1),
            attn_dropout=hf.get("attn_pdrop", 0.1), resid_dropout=hf.get("resid_pdrop", 0.1))
    d, n, heads = hf["hidden_size"], hf["num_hidden_layers"], hf["num_attention_heads"]
    if t == "gpt_neox":
        head_dim = d // heads
        partial = rope.get("partial_rotary_factor", hf.get("rotary_pct", hf.get("partial_rotary_factor", 0.25)))
        return ModelConfig(
            **common, hidden_size=d, num_layers=n, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
            intermediate_size=hf["intermediate_size"], max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=rope_theta,
            rotary_dim=int(head_dim * partial), rope_scaling=rope_scaling, mlp="plain",
            hidden_act=hf.get("hidden_act", "gelu"), parallel_residual=hf.get("use_parallel_residual", True),
            qkv_bias=hf.get("attention_bias", True), o_bias=hf.get("attention_bias", True), mlp_bias=True,
            sliding_windows=[None] * n, tie_word_embeddings=hf.get("tie_word_embeddings", False),
            embd_dropout=hf.get("hidden_dropout", 0.0), attn_dropout=hf.get("attention_dropout", 0.0),
            resid_dropout=hf.get("hidden_dropout", 0.0))
    # Llama, Qwen2, Qwen3, Mistral
    head_dim = hf.get("head_dim") or (128 if t == "qwen3" else d // heads)
    window = hf.get("sliding_window")
    if t in ("qwen2", "qwen3"):
        window = window if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(n)]
        windows = [window if kind == "sliding_attention" else None for kind in layer_types]
    else:
        windows = [window if t == "mistral" else None] * n
    bias = hf.get("attention_bias", False)
    return ModelConfig(
        **common, hidden_size=d, num_layers=n, num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
        rotary_dim=int(head_dim * rope.get("partial_rotary_factor", 1.0)), rope_scaling=rope_scaling, mlp="swiglu",
        hidden_act=hf.get("hidden_act", "silu"), qkv_bias=True if t == "qwen2" else bias, o_bias=bias and t != "qwen2",
        mlp_bias=hf.get("mlp_bias", False), qk_norm=t == "qwen3", sliding_windows=windows,
        tie_word_embeddings=hf.get("tie_word_embeddings", False), attn_dropout=hf.get("attention_dropout", 0.0))


def config_to_hf(model: CausalLM | RewardModel) -> dict:
    """The config.json to write: the one we loaded, with the architecture, labels, pad id and dtype of this model."""
    cfg = model.cfg
    hf = {k: v for k, v in cfg.hf_config.items() if k not in ("torch_dtype", "num_labels", "id2label", "label2id")}
    head = "ForSequenceClassification" if isinstance(model, RewardModel) else (
        "LMHeadModel" if cfg.model_type == "gpt2" else "ForCausalLM")
    hf["architectures"] = [ARCH[cfg.model_type] + head]
    if isinstance(model, RewardModel):
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    hf["pad_token_id"] = cfg.pad_token_id
    hf["tie_word_embeddings"] = cfg.tie_word_embeddings
    hf["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return hf


# ----------------------------------------------------------------------------------------------------------------
# weight names


def hf_name(cfg: ModelConfig, ours: str) -> str:
    """Our parameter name -> the Hugging Face tensor name that holds it (fused q/k/v share one)."""
    if not ours.startswith("transformer."):
        return ours  # lm_head.weight, score.weight
    module, param = ours.removeprefix("transformer.").rsplit(".", 1)
    layer = re.search(r"\.(\d+)\.", module)
    template = re.sub(r"\.\d+\.", ".{}.", module, count=1)
    name = NAMES[cfg.model_type][template]
    return f"{PREFIX[cfg.model_type]}.{name.format(layer.group(1)) if layer else name}.{param}"


def from_hf_tensor(cfg: ModelConfig, ours: str, t: torch.Tensor) -> torch.Tensor:
    """Undo the storage layout of a Hugging Face tensor: Conv1D transpose, fused q/k/v split."""
    proj = ours.split(".")[-2]
    if cfg.model_type == "gpt2" and t.ndim == 2 and (".attn." in ours or ".mlp." in ours):
        t = t.t()  # Conv1D stores (in, out)
    if proj in QKV and cfg.model_type == "gpt2":
        return t.chunk(3, dim=0)[QKV[proj]]  # [q; k; v] stacked
    if proj in QKV and cfg.model_type == "gpt_neox":
        per_head = t.view(cfg.num_heads, 3, cfg.head_dim, *t.shape[1:])  # [q_h; k_h; v_h] for each head h
        return per_head[:, QKV[proj]].reshape(cfg.num_heads * cfg.head_dim, *t.shape[1:])
    return t


def to_hf_tensors(cfg: ModelConfig, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of from_hf_tensor over a whole state dict: fuse q/k/v back and transpose GPT-2's Conv1D."""
    out, fused = {}, {}
    for name, t in ours.items():
        target, proj = hf_name(cfg, name), name.split(".")[-2]
        if proj in QKV and cfg.model_type in ("gpt2", "gpt_neox"):
            fused.setdefault(target, [None] * 3)[QKV[proj]] = t
            continue
        out[target] = t.t() if cfg.model_type == "gpt2" and t.ndim == 2 and (".attn." in name or ".mlp." in name) else t
    for target, (q, k, v) in fused.items():
        if cfg.model_type == "gpt2":
            t = torch.cat([q, k, v], dim=0)
            out[target] = t.t() if t.ndim == 2 else t
        else:
            heads = [x.view(cfg.num_heads, cfg.head_dim, *x.shape[1:]) for x in (q, k, v)]
            out[target] = torch.stack(heads, dim=1).reshape(3 * cfg.num_heads * cfg.head_dim, *q.shape[1:])
    return {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------------
# files


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors or of the shards in model.safetensors.index.json ({} when there are none)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    tensors = {}
    for name in files:
        try:
            with safe_open(folder / name, framework="pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as e:
            raise ValueError(f"{folder / name}: cannot read safetensors file ({e})") from None
    return tensors


def parse_dtype(dtype, hf: dict) -> torch.dtype:
    """None -> float32 (TRL's default for training); "auto" -> the checkpoint's dtype; a name or torch.dtype."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16, float16 or auto")
        dtype = getattr(torch, dtype)
    return dtype


@contextlib.contextmanager
def skipped_init():
    """Modules built inside skip torch's random initialisation: their weights are about to be overwritten, so they
    stay uninitialised memory, which costs no time and, until written, no resident pages. (Built on the meta device
    instead, they would import torch._dynamo, ~70 MB of resident memory for the rest of the run.) transformers'
    `no_init_weights` replaces torch's initialisers the same way."""
    initialisers = {name: getattr(nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_")}
    for name in initialisers:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, initialiser in initialisers.items():
            setattr(nn.init, name, initialiser)


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Fresh random weights as transformers initialises them: N(0, initializer_range), zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def load_pretrained(cls, name_or_path: str, revision=None, dtype=None, device=None, new_model: bool = False):
    """Build `cls` (CausalLM or RewardModel) from a Hugging Face folder or Hub id; see the module docstring.

    A local folder with a config.json and no weight file at all is initialised randomly only as a `new_model` (the
    starting model_name_or_path of reward or SFT training, e.g. the toy task's model/); anywhere else (PPO's models,
    a checkpoint, a Hub repo) it is an error: a half-written or wrongly copied
    folder must not train, or score, as a random model. Weights are read from safetensors only: a folder holding
    pickled ones (pytorch_model.bin, *.pt) is refused, unopened. Code beside the weights (`auto_map`, modeling_*.py)
    is never imported: the architecture comes from model_type alone, as transformers does without trust_remote_code."""
    folder = local_or_hub(name_or_path, ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"], revision)
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder}: no config.json, so this is not a Hugging Face model folder")
    hf = read_json(folder / "config.json")
    cfg = config_from_hf(hf, str(folder / "config.json"))
    dtype, device = parse_dtype(dtype, hf), torch.device(device or "cpu")
    tensors = read_safetensors(folder)
    if issubclass(cls, RewardModel):
        # A trained head fixes num_labels; a causal LM loaded as a reward model gets one output, as TRL forces.
        cfg = replace(cfg, num_labels=tensors["score.weight"].shape[0] if "score.weight" in tensors else 1)
    weights = r"(pytorch_model|model|consolidated)[-.\w]*\.(bin|pt|pth|ckpt)(\.index\.json)?"  # not optimizer.pt
    pickled = sorted(p.name for p in folder.iterdir() if re.fullmatch(weights, p.name))
    if not tensors and pickled:  # never unpickled: loading a pickle can run any code it names
        raise ValueError(f"{folder}: weights only in {pickled[0]}, a pickle; minirlhf reads safetensors only (convert "
                         "with transformers: from_pretrained, then save_pretrained(safe_serialization=True))")
    from_hub = not Path(name_or_path).expanduser().exists()  # a Hub repo without safetensors is no new model
    if not tensors and (not new_model or from_hub):
        raise ValueError(f"{folder}: config.json but no weights (no *.safetensors file); point to a trained model "
                         "folder (a half-written save? a missing file?)")
    if not tensors:
        print0(f"[minirlhf] {folder} has no weights: initialising {ARCH[cfg.model_type]} randomly")
        model = cls(cfg)
        init_weights(model, cfg)
        return model.to(device=device, dtype=dtype)

    # Checkpoints of the bare backbone (e.g. LlamaModel) have no prefix; transformers accepts them, so do we.
    prefix = PREFIX[cfg.model_type] + "."
    if not any(k.startswith(prefix) for k in tensors):
        tensors = {(k if k in ("lm_head.weight", "score.weight") else prefix + k): v for k, v in tensors.items()}
    if "embed_out.weight" in tensors:  # GPT-NeoX's name for lm_head
        tensors["lm_head.weight"] = tensors.pop("embed_out.weight")

    with skipped_init():
        model = cls(cfg)  # no random numbers drawn: a new score head's draw below is transformers' first
    state, used, new_head = {}, set(), False
    for name, param in model.state_dict().items():
        source = hf_name(cfg, name)
        if source not in tensors:
            if name == "score.weight":
                new_head = True
                continue
            raise ValueError(f"{folder}: tensor {source} is missing from the checkpoint")
        used.add(source)
        t = from_hf_tensor(cfg, name, tensors[source])
        if t.shape != param.shape:
            raise ValueError(f"{folder}: tensor {source} has shape {tuple(tensors[source].shape)}, "
                             f"expected {tuple(param.shape)} for this config.json")
        state[name] = t.to(device=device, dtype=dtype)
    # Only a head the other model type owns may be left over (transformers' "unexpected" lm_head / score).
    unexpected = set(tensors) - used - {"lm_head.weight", "score.weight"}
    if unexpected:
        raise ValueError(f"{folder}: unexpected tensors {sorted(unexpected)[:5]} for model_type {cfg.model_type}")
    if isinstance(model, CausalLM) and model.lm_head is not None and "lm_head.weight" not in tensors:
        raise ValueError(f"{folder}: tensor lm_head.weight is missing from the checkpoint")
    if new_head:
        # transformers draws a new head as normal_(0, initializer_range) (_init_weights); after the same seed this
        # is the same first draw from the global generator, so TRL's initial head is reproduced bit for bit.
        print0(f"[minirlhf] {folder} has no score head: initialising a new one, N(0, {cfg.initializer_range})")
        state["score.weight"] = torch.empty(cfg.num_labels, cfg.hidden_size).normal_(0, cfg.initializer_range).to(
            device=device, dtype=dtype)
    model.load_state_dict(state, assign=True)
    if cfg.positions == "rope":
        model.transformer.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in checkpoints
    return model


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a failed write (a full disk) as its own error: make it an OSError
        raise OSError(f"{path}: {e}") from None


def save_pretrained(model: CausalLM | RewardModel, save_dir: str, max_shard_size: int = 5 * 1024**3,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors (or shards with an index) as transformers expects them.
    `state_dict`: the weights to write, if not model.state_dict() (an FSDP model's, gathered whole).

    Atomic for readers: every file is written and fsync'ed in a temporary folder inside save_dir, then renamed into
    place, weights first and config.json last, so a crash at any moment leaves the previous model or the new one
    (a config.json always next to complete weights), never a folder whose weights are missing."""
    save_dir = Path(save_dir)
    tmp = save_dir / ".tmp-save"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = model.cfg
    state_dict = model.state_dict() if state_dict is None else state_dict
    tensors = to_hf_tensors(cfg, {k: v.detach().cpu() for k, v in state_dict.items()})
    if cfg.model_type == "gpt_neox" and "lm_head.weight" in tensors:
        tensors["embed_out.weight"] = tensors.pop("lm_head.weight")  # the name transformers 5.23 writes
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        write_safetensors(shards[0], tmp / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(shard, tmp / file)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if isinstance(model, CausalLM):
        gen = {k: cfg.hf_config.get(k) for k in ("bos_token_id", "eos_token_id") if cfg.hf_config.get(k) is not None}
        if cfg.pad_token_id is not None:
            gen["pad_token_id"] = cfg.pad_token_id
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_to_hf(model), indent=2, sort_keys=True) + "\n")

    new = sorted(p.name for p in tmp.iterdir())
    for name in new:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    # Shards before the index (the index makes them current), config.json last; then stale files of a previous save
    # with another sharding: the index first (while it exists it names the old shards, which are still whole).
    for name in sorted(new, key=lambda n: (n == "config.json", n.endswith(".index.json"))):
        os.replace(tmp / name, save_dir / name)
    stale = [p for p in save_dir.glob("model*.safetensors*") if p.name not in new]
    for old in sorted(stale, key=lambda p: not p.name.endswith(".index.json")):
        old.unlink()
    tmp.rmdir()
