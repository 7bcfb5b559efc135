"""PPO for RLHF: TRL's PPOTrainer (trl.experimental.ppo, last shipped in TRL 1.12) as one flat loop.

References: Schulman et al. 2017 (PPO); Ziegler et al. 2019 and Ouyang et al. 2022 (RLHF with a KL penalty);
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"; TRL trl/experimental/ppo/ppo_config.py and
ppo_trainer.py (spec §4-§5).

Run: `python -m minirlhf.ppo configs/ppo.toml [--key value ...]`, or under `torchrun -m` for several ranks;
`--help` lists every key.

PPOConfig keeps TRL's names and defaults. TRL keys left out, accepted only at TRL's default (see --help):
`dataset_num_proc` (prompts are tokenized in the main process), `push_to_hub`, the PEFT adapter names
`model_adapter_name` / `ref_adapter_name`, and `ds3_gather_for_generation` (DeepSpeed ZeRO-3 only).
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

from minirlhf.config import TrainingConfig, require


@dataclass
class PPOConfig(TrainingConfig):
    """PPO (TRL experimental PPOConfig: TrainingArguments + TRL's defaults + the fields below)."""

    trl_defaults_only: ClassVar[dict[str, object]] = {
        "dataset_num_proc": None, "push_to_hub": False, "model_adapter_name": None, "ref_adapter_name": None,
        "ds3_gather_for_generation": True,
    }

    # ---- models
    learning_rate: float = 3e-6
    """peak AdamW learning rate, shared by the policy and the value model (TRL PPOConfig's default)"""
    sft_model_path: str = "EleutherAI/pythia-160m"
    """the policy's starting point (an SFT causal LM); also the frozen reference policy"""
    reward_model_path: str = "EleutherAI/pythia-160m"
    """sequence-classification model that scores responses; also initialises the value model"""

    # ---- rollouts
    total_episodes: int | None = None
    """prompts to train on in total; None: int(num_train_epochs * len(train dataset))"""
    num_mini_batches: int = 1
    """minibatches each batch of rollouts is split into, one optimizer step each"""
    num_ppo_epochs: int = 4
    """passes of PPO optimisation over each batch of rollouts"""
    local_rollout_forward_batch_size: int = 64
    """sequences per rank per no-grad forward (generation, reference, value and reward)"""
    response_length: int = 53
    """new tokens sampled per prompt (max_new_tokens)"""
    temperature: float = 0.7
    """sampling temperature (TRL adds 1e-7 wherever it divides by it)"""
    stop_token: str | None = None
    """"eos": stop and truncate responses at the tokenizer's EOS; cannot be combined with stop_token_id"""
    stop_token_id: int | None = None
    """token id to stop and truncate responses at; None (and no stop_token): responses run to response_length"""
    missing_eos_penalty: float | None = None
    """subtracted from the score of responses that contain no EOS token"""
    num_sample_generations: int = 10
    """times to print greedy sample completions during training (0: never)"""

    # ---- rewards and losses
    kl_coef: float = 0.05
    """beta, the weight of the per-token KL penalty against the reference policy"""
    kl_estimator: str = "k1"
    """per-token KL estimate: "k1" (log-ratio) or "k3" (lower variance; Schulman's "Approximating KL Divergence")"""
    whiten_rewards: bool = False
    """whiten the per-token rewards over each minibatch before GAE (needs local_mini_batch_size >= 8)"""
    cliprange: float = 0.2
    """epsilon of the clipped policy-ratio objective"""
    cliprange_value: float = 0.2
    """clip range of the value predictions around their rollout values"""
    vf_coef: float = 0.1
    """weight of the value loss in the total loss"""
    gamma: float = 1.0
    """discount factor"""
    lam: float = 0.95
    """GAE lambda"""

    # ---- filled at runtime by set_runtime_sizes (PPOTrainer.__init__ in TRL); cannot be set in a config
    world_size: int | None = field(default=None, init=False)
    """number of processes (ranks)"""
    local_batch_size: int | None = field(default=None, init=False)
    """rollouts per rank per PPO update: HF's per_device_train_batch_size * gradient_accumulation_steps"""
    micro_batch_size: int | None = field(default=None, init=False)
    """sequences per forward/backward over all ranks: HF's per_device_train_batch_size * world_size"""
    batch_size: int | None = field(default=None, init=False)
    """rollouts per PPO update over all ranks: local_batch_size * world_size"""
    mini_batch_size: int | None = field(default=None, init=False)
    """rollouts per optimizer step over all ranks: batch_size / num_mini_batches"""
    local_mini_batch_size: int | None = field(default=None, init=False)
    """rollouts per optimizer step per rank: local_batch_size / num_mini_batches"""
    num_total_batches: int | None = field(default=None, init=False)
    """PPO updates in the run: ceil(total_episodes / batch_size), so the run may exceed total_episodes"""
    sample_generations_freq: int | None = field(default=None, init=False)
    """print sample completions every this many updates (None when num_sample_generations is 0)"""
    local_seed: int | None = field(default=None, init=False)
    """this rank's sampling seed: seed + rank * 100003"""

    def __post_init__(self):
        super().__post_init__()
        for key in ("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "response_length"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)!r}")
        require(self.stop_token in (None, "eos"), "stop_token",
                f"{self.stop_token!r} is not 'eos' or none (no stop token)")
        # TRL tests `stop_token and stop_token_id`, so it lets stop_token_id=0 through; we test for None.
        require(self.stop_token is None or self.stop_token_id is None, "stop_token",
                "set stop_token or stop_token_id, not both")
        require(self.kl_estimator in ("k1", "k3"), "kl_estimator", f"{self.kl_estimator!r} is not 'k1' or 'k3'")

    def set_runtime_sizes(self, world_size: int, train_dataset_len: int, rank: int = 0) -> None:
        """Fill the runtime block from the number of ranks and prompts, as TRL's PPOTrainer.__init__ does."""
        if self.total_episodes is None:  # episodes given in epochs
            self.total_episodes = int(self.num_train_epochs * train_dataset_len)
        self.world_size = world_size
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.micro_batch_size = self.per_device_train_batch_size * world_size
        self.batch_size = self.local_batch_size * world_size
        for key, of in (("mini_batch_size", "batch_size"), ("local_mini_batch_size", "local_batch_size")):
            size = getattr(self, of)
            require(size % self.num_mini_batches == 0, "num_mini_batches",
                    f"{of} = {size} is not a multiple of num_mini_batches = {self.num_mini_batches}")
            setattr(self, key, size // self.num_mini_batches)
        require(not self.whiten_rewards or self.local_mini_batch_size >= 8, "whiten_rewards",
                f"needs local_mini_batch_size >= 8 for whitening, got {self.local_mini_batch_size}")
        self.num_total_batches = math.ceil(self.total_episodes / self.batch_size)
        if self.num_sample_generations > 0:
            self.sample_generations_freq = max(1, self.num_total_batches // self.num_sample_generations)
        self.local_seed = self.seed + rank * 100003  # TRL: a prime offset per rank
