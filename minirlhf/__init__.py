"""minirlhf: a minimal, pure-PyTorch reference implementation of RLHF (reward-model training and PPO).

The reading floor is this folder; minirlhf/infra/ is the machine room, skipped on a first reading.
"""

from minirlhf.infra import exit_quietly_on_ctrl_c_while_starting

exit_quietly_on_ctrl_c_while_starting()  # first: torch is slow to import

from minirlhf.infra.hf import load_pretrained, save_pretrained  # noqa: E402
from minirlhf.model import CausalLM, ModelConfig, RewardModel  # noqa: E402

__all__ = ["CausalLM", "ModelConfig", "RewardModel", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
