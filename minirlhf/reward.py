"""Reward-model training: TRL's RewardTrainer as one flat loop (Bradley-Terry loss on chosen/rejected pairs).

References: Ouyang et al. 2022 (InstructGPT, Eq. 1); Eisenstein et al. 2023 (Eq. 2, reward centring);
TRL trl/trainer/reward_config.py and reward_trainer.py (spec §1-§2).

Run: `python -m minirlhf.reward configs/reward.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key.

RewardConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`model_init_kwargs` (its useful entries are the `dtype` and `model_revision` keys), `trust_remote_code` (minirlhf
never runs Hub code), `dataset_num_proc` (tokenization runs in the main process; there is no `datasets.map`).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from minirlhf.config import TrainingConfig, require


@dataclass
class RewardConfig(TrainingConfig):
    """Reward-model training (TRL RewardConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "model_init_kwargs": None, "trust_remote_code": False, "dataset_num_proc": None,
    }

    learning_rate: float = 1e-4
    """peak AdamW learning rate (TRL RewardConfig's default; TrainingArguments has 5e-5)"""
    max_length: int | None = 1024
    """drop pairs whose chosen or rejected side is longer than this many tokens (TRL filters, never truncates)"""
    pad_to_multiple_of: int | None = None
    """pad each batch's sequence length up to a multiple of this"""
    eos_token: str | None = None
    """end-of-sequence token appended to non-conversational texts; None: the tokenizer's (must be in the vocabulary)"""
    pad_token: str | None = None
    """pad token; None: the tokenizer's, else its EOS (TRL deprecates this key for tokenizer.pad_token, not in TOML)"""
    chat_template_path: str | None = None
    """a .jinja/.j2 file used as the chat template for conversational data (needs jinja2)"""
    disable_dropout: bool = True
    """set every dropout probability in the model to 0"""
    center_rewards_coefficient: float | None = None
    """weight of the mean-zero reward penalty (Eisenstein et al. 2023, Eq. 2; 0.01 recommended); None: off"""
    activation_offloading: bool = False
    """keep activations saved for backward in CPU memory (torch.autograd.graph.save_on_cpu); no effect on CPU"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("max_length", "pad_to_multiple_of"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be >= 1 or none, got {value!r}")
        # TRL also takes a tokenizer path here and copies its template (clone_chat_template); minirlhf does not.
        path = self.chat_template_path
        require(path is None or Path(path).suffix in (".jinja", ".j2"), "chat_template_path",
                f"must be a .jinja or .j2 file, got {path!r}")
