"""Hand-written AdamW, weight-decay grouping and LR schedules: what transformers.Trainer 5.23 sets up for TRL.

- `param_groups`: the decay / no-decay split of `Trainer.create_optimizer` (transformers trainer.py).
- `AdamW`: Adam (Kingma & Ba 2015, Alg. 1) with decoupled weight decay (Loshchilov & Hutter 2019, Alg. 2),
  numerically the update of `torch.optim.AdamW`, which Trainer builds with `fused=True` (`optim="adamw_torch_fused"`).
- `lr_multiplier`: the LambdaLR multipliers of transformers optimization.py ("linear", "cosine", "constant",
  "constant_with_warmup"); `steps_from` is `TrainingArguments.get_warmup_steps`, also used for logging/eval/save steps.

Left out: amsgrad, maximize, closures, foreach/fused kernels and the other transformers schedules. On CPU, neither
`torch._foreach_*` nor flat per-group buffers beat this per-parameter loop (benchmarks/bench_adamw.py): the eight
element-wise passes over every parameter cost the same as 8 large ops or 8 per tensor. torch's fused kernel (one pass)
is ~3x faster but differs in the last bits from `foreach=False`, the oracle of our bitwise tests.

The loops set the learning rate of each step themselves (`set_lr`): the one after `step` completed steps,
`learning_rate * lr_multiplier(step, ...)`, is the one logged, as in transformers 5.23.
"""

import math

import torch
from torch import nn

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, decay then no-decay, of the trainable parameters in `named_parameters` order.

    transformers exempts biases and normalisation weights by module type and name (`get_decay_parameter_names`);
    for GPT-2, NeoX, Llama, Qwen2/3 and Mistral those are exactly the 1-D tensors (nanoGPT's `dim >= 2` rule).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class AdamW:
    """AdamW with torch's conventions; state per parameter: `step` (int), `exp_avg`, `exp_avg_sq`.

    One step, for a parameter p with gradient g (parameters without a gradient are skipped):
      1. decoupled weight decay: p *= 1 - lr * weight_decay  (torch scales the decay by lr; the paper by the schedule)
      2. moments: m = beta1 * m + (1 - beta1) * g;  v = beta2 * v + (1 - beta2) * g^2
      3. bias corrections: bc1 = 1 - beta1^t, bc2 = 1 - beta2^t
      4. p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
    eps is added after the bias correction (Kingma & Ba Alg. 1, torch), not to the raw sqrt(v) as in the paper's
    "more efficient" form (TensorFlow's epsilon-hat); the two differ early in training.

    The interface and the checkpoint layout are torch.optim.Optimizer's (`param_groups`, `state`, `zero_grad`,
    `state_dict`, `load_state_dict`), but not the class: its methods import torch._dynamo, ~70 MB of resident memory
    and a second of start-up, for hooks this loop never uses.
    """

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"AdamW: lr={lr}, eps={eps}, weight_decay={weight_decay} must all be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas={betas} must each be in [0, 1)")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.param_groups = [{**defaults, **group} for group in groups]  # param_groups(): a group's own keys win
        self.state = {}  # parameter -> its state, from its first step on
        self._denom = {}  # (dtype, device) -> one scratch buffer, as large as the largest parameter

    def _scratch(self, p: torch.Tensor) -> torch.Tensor:
        """Room for p's denominator: reused, because a fresh allocation of the larger tensors (the 16 MiB embedding)
        costs page faults on every step (4-12% of the step on CPU, benchmarks/bench_adamw.py)."""
        buf = self._denom.get((p.dtype, p.device))
        if buf is None or buf.numel() < p.numel():
            buf = self._denom[(p.dtype, p.device)] = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        return buf[: p.numel()].view_as(p)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p not in self.state:
                    self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                state = self.state[p]
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

                if weight_decay != 0.0:
                    p.mul_(1.0 - lr * weight_decay)  # 1.
                exp_avg.lerp_(grad, 1.0 - beta1)  # 2.
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias_correction1 = 1.0 - beta1 ** state["step"]  # 3.
                bias_correction2 = 1.0 - beta2 ** state["step"]
                # 4. `** 0.5` as torch writes it (math.sqrt differs in the double's last bit at some steps)
                bias_correction2_sqrt = bias_correction2**0.5
                if type(exp_avg_sq) is not torch.Tensor:  # an FSDP shard (a DTensor): the scratch buffer can't hold it
                    denom = exp_avg_sq.sqrt()
                elif subnormals_vanish(p.dtype, eps, bias_correction2_sqrt):  # the same bits, without sqrt's slow path
                    denom = torch.clamp(exp_avg_sq, min=torch.finfo(p.dtype).tiny, out=self._scratch(p)).sqrt_()
                else:
                    denom = torch.sqrt(exp_avg_sq, out=self._scratch(p))
                denom.div_(bias_correction2_sqrt).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)

    def zero_grad(self) -> None:
        """Drop the gradients (torch's set_to_none): the next backward allocates them afresh."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_dict(self) -> dict:
        """torch.optim.Optimizer's layout: parameters numbered across the groups in order (tensors not copied)."""
        number = {p: i for i, p in enumerate(p for group in self.param_groups for p in group["params"])}
        return {"state": {number[p]: dict(state) for p, state in self.state.items()},
                "param_groups": [{**group, "params": [number[p] for p in group["params"]]}
                                 for group in self.param_groups]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state_dict() of an optimizer over the same shapes in the same groups (moments cast to each
        parameter's device and dtype)."""
        saved_groups, params = state_dict["param_groups"], [p for g in self.param_groups for p in g["params"]]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved parameter groups differ in size from this optimizer's")
        state = {}
        for i, saved in state_dict["state"].items():
            p = params[i]
            if any(saved[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"the saved state of parameter {i} does not match its shape {tuple(p.shape)}")
            state[p] = {"step": int(saved["step"]),  # torch's AdamW keeps a tensor
                        **{k: saved[k].to(p.device, p.dtype) for k in ("exp_avg", "exp_avg_sq")}}
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = state


def subnormals_vanish(dtype: torch.dtype, eps: float, bias_correction2_sqrt: float) -> bool:
    """Whether every v below the dtype's smallest normal number ("tiny") gives sqrt(v) / sqrt(bc2) + eps == eps, bit
    for bit: when sqrt(tiny) / sqrt(bc2) is under an eighth of eps's spacing in fp32 (torch adds in fp32 for bf16 too).
    Then AdamW can raise such v to tiny before the square root without changing a bit of the step, and that spares
    torch's CPU sqrt its slow path, 5x slower on 0 and subnormals (MKL, AMD EPYC), where the moments of every
    embedding row no batch has used sit (bench_ppo's spread set: AdamW 0.19 -> 0.16 s per update, profile_ppo.py)."""
    return math.sqrt(torch.finfo(dtype).tiny) / bias_correction2_sqrt < eps * 2.0**-26


def set_lr(optimizer: AdamW, lr: float) -> None:
    """Write `lr` into every parameter group (the schedule is applied by the loop, not by a scheduler object)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def steps_from(value: float, total_steps: int) -> int:
    """TrainingArguments' one rule for warmup, logging, eval and save steps: a value >= 1 is a step count, a value
    in [0, 1) that fraction of the run, rounded up (get_warmup_steps; eval/save/logging steps in Trainer)."""
    if value < 0:
        raise ValueError(f"warmup_steps, logging_steps, eval_steps and save_steps must be >= 0, got {value}")
    return int(value) if value >= 1 else math.ceil(total_steps * value)


def schedule_kwargs(schedule: str, lr_scheduler_kwargs: dict | None) -> dict:
    """Check `lr_scheduler_kwargs` and return the keyword arguments for `lr_multiplier`.

    Only cosine's `num_cycles` shapes these four schedules. transformers drops extra keys for the constant ones and
    raises TypeError for the others; `last_epoch` (scheduler-object resume) has no meaning here. We refuse them all.
    """
    kwargs = dict(lr_scheduler_kwargs or {})
    unsupported = sorted(set(kwargs) - ({"num_cycles"} if schedule == "cosine" else set()))
    if unsupported:
        raise ValueError(
            f"lr_scheduler_kwargs: {unsupported} not supported for lr_scheduler_type={schedule!r} "
            "(only 'num_cycles', for 'cosine')"
        )
    return kwargs


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, num_cycles: float = 0.5) -> float:
    """Factor on the peak LR after `step` completed optimizer steps (transformers optimization.py lambdas)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type={schedule!r} is not supported; choose one of {SCHEDULES}")
    if schedule == "constant":
        return 1.0
    if step < warmup_steps:  # linear warmup from 0
        return step / max(1, warmup_steps)
    if schedule == "constant_with_warmup":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    progress = (step - warmup_steps) / decay_steps  # cosine: num_cycles=0.5 is a half wave from 1 down to 0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * num_cycles * progress)))
