"""minirlhf: a minimal, pure-PyTorch reference implementation of RLHF (reward-model training and PPO)."""

from minirlhf.model import CausalLM, ModelConfig, RewardModel

__all__ = ["CausalLM", "ModelConfig", "RewardModel"]
__version__ = "0.1.0"
