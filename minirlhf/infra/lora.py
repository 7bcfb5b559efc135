"""LoRA, natively: low-rank adapters on chosen Linear layers, switched off to get the base model back, merged, and
saved in PEFT's layout (adapter_config.json + adapter_model.safetensors) so that `peft.PeftModel.from_pretrained`
loads them; a LoRA run's checkpoints hold the adapter alone, which `load_adapter` puts back on resume. PPO uses it
for the policy (`use_peft`): the reference log-probs come from the same model with its adapters disabled, so no
reference copy is kept in memory; SFT and reward modelling for their model.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (Eq. 3: h = W0 x + (alpha / r) B A x);
PEFT src/peft/tuners/lora/layer.py (`Linear`: A kaiming-uniform with a = sqrt(5), B zeros, dropout on x) and
TRL's ModelConfig names (`lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`).
"""

import contextlib
import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minirlhf.infra.config import require
from minirlhf.infra.hf import hf_name
from minirlhf.model import RewardModel

UNFUSED = ("llama", "qwen2", "qwen3", "mistral")  # q/k/v are separate Linears in HF too, so PEFT names match ours
LORA_DEFAULT = ["q_proj", "v_proj"]  # PEFT's default targets for Llama-like models


@dataclass
class LoraArgs:
    """TRL ModelConfig's LoRA fields, shared by the three trainers' configs (a mixin before TrainingConfig)."""

    use_peft: bool = False
    """train LoRA adapters instead of every weight (a reward model's new score head trains in full, as PEFT's SEQ_CLS
    modules_to_save; PPO's reference is the policy with its adapters off); saves the adapter (PEFT layout) and the
    merged model in merged/, and checkpoints hold the adapter"""
    lora_r: int = 16
    """LoRA rank (TRL's default)"""
    lora_alpha: int = 32
    """LoRA scaling numerator: the update is (lora_alpha / lora_r) B A (TRL's default)"""
    lora_dropout: float = 0.05
    """dropout on the adapters' input (TRL's default; disable_dropout turns it off too)"""
    lora_target_modules: list[str] | None = None
    """Linear layers to adapt, by name; None: ["q_proj", "v_proj"], PEFT's choice for Llama-like models"""

    def __post_init__(self):
        super().__post_init__()
        if not self.use_peft:
            return
        require(self.lora_r >= 1, "lora_r", f"must be >= 1, got {self.lora_r}")
        require(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        require(not self.fsdp, "fsdp", "use_peft runs with DDP or one process, not FSDP")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))), the base frozen; `enabled` False gives base(x) alone."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scaling, self.enabled = base.requires_grad_(False), alpha / r, True
        self.r, self.alpha, self.dropout_p = r, alpha, dropout  # as configured, for adapter_config.json
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: the adapter starts at 0
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, in)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | None) -> list[str]:
    """Wrap every Linear whose own name is in target_modules (None: LORA_DEFAULT); freeze all else. Returns the
    wrapped modules' names; a ValueError if none matched or the family fuses q/k/v (GPT-2, GPT-NeoX)."""
    target_modules = target_modules or LORA_DEFAULT
    if model.cfg.model_type not in UNFUSED:
        raise ValueError(f"use_peft: LoRA supports {', '.join(UNFUSED)}, not {model.cfg.model_type} (fused q/k/v)")
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and name.rpartition(".")[2] in target_modules and name.startswith("transformer.")]
    if not names:
        raise ValueError(f"lora_target_modules: {target_modules} names no Linear layer of the model")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model inside the block (PEFT's `disable_adapter`); a no-op for a model without adapters."""
    layers = lora_layers(model).values()
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A copy of the model with each adapter folded into its base weight, W0 + (alpha / r) B A, and plain Linears
    again (PEFT's merge_and_unload): a model hf.save_pretrained writes in Hugging Face layout."""
    out = copy.deepcopy(model)
    for name, layer in lora_layers(out).items():
        layer.base.weight += layer.delta_weight()
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, layer.base)
    return out


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Everything that trains, by its name in PEFT's adapter_model.safetensors: base_model.model.<HF module>.lora_A
    .weight / lora_B.weight, and a reward model's whole score head (PEFT's modules_to_save)."""
    params = {}
    for name, layer in lora_layers(model).items():
        hf_module = hf_name(model.cfg, f"{name}.weight").removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            params[f"base_model.model.{hf_module}.{part}.weight"] = getattr(layer, part).weight
    if isinstance(model, RewardModel):
        params["base_model.model.score.weight"] = model.score.weight
    return params


def save_adapter(model: nn.Module, folder: str | Path, base_model_path: str | None) -> None:
    """adapter_config.json and adapter_model.safetensors (adapter_parameters) in PEFT's layout; r, alpha and dropout
    as add_lora set them (every layer shares them)."""
    layer = next(iter(lora_layers(model).values()))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in adapter_parameters(model).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    seq_cls = isinstance(model, RewardModel)
    targets = sorted({name.rpartition(".")[2] for name in lora_layers(model)})
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS" if seq_cls else "CAUSAL_LM", "r": layer.r,
              "lora_alpha": layer.alpha, "lora_dropout": layer.dropout_p, "target_modules": targets, "bias": "none",
              "base_model_name_or_path": base_model_path, "fan_in_fan_out": False, "inference_mode": True,
              "modules_to_save": ["score"] if seq_cls else None}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """save_adapter's tensors into the model's adapters (and score head), as a resumed run starts; a one-line
    ValueError naming the file if it is unreadable or made for other adapters."""
    file = Path(folder) / "adapter_model.safetensors"
    if not file.exists():
        raise ValueError(f"{folder}: holds no adapter (adapter_model.safetensors): a run without use_peft saved it")
    try:
        tensors = load_file(str(file))
    except Exception as e:  # truncated, not safetensors
        raise ValueError(f"{file}: cannot read the adapter ({str(e).strip() or type(e).__name__})") from None
    params = adapter_parameters(model)
    if tensors.keys() != params.keys() or any(tensors[k].shape != p.shape for k, p in params.items()):
        raise ValueError(f"{file}: does not fit this model's adapters (another lora_r or lora_target_modules?)")
    for name, p in params.items():
        p.copy_(tensors[name])
