"""minirlhf.optim against torch.optim.AdamW and transformers' Trainer grouping, warmup and LR schedules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments, get_scheduler

from minirlhf.optim import (
    AdamW,
    lr_multiplier,
    param_groups,
    schedule_kwargs,
    set_lr,
    steps_from,
    subnormals_vanish,
)

ROOT = Path(__file__).resolve().parents[1]


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    # embedding + linears with biases + a LayerNorm: both groups are non-empty
    return nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 50))


def _run(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Feed the same random gradients and LRs for the given step numbers, whichever optimizer is used."""
    params = list(model.parameters())
    for step in steps:
        g = torch.Generator().manual_seed(1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        params[0].grad *= 1e-8  # gradients of eps's size: where eps is added matters
        if step % 2 == 1:
            params[-1].grad = None  # no gradient on odd steps: both sides skip it, its state included
        if step < 2:
            params[1].grad = None  # a gradient only from step 2 on: its state starts late, its step count lags
        set_lr(optimizer, 1e-2 * (0.1 + torch.rand((), generator=g).item()))  # a different LR each step
        optimizer.step()


def _assert_same_run(ours_model, ours_opt, theirs_model, theirs_opt, atol: float = 0.0) -> None:
    for ours_p, theirs_p in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
        torch.testing.assert_close(ours_p, theirs_p, rtol=0, atol=atol)
        ours_state, theirs_state = ours_opt.state[ours_p], theirs_opt.state[theirs_p]
        assert ours_state["step"] == int(theirs_state["step"]) and isinstance(ours_state["step"], int)
        for key in ("exp_avg", "exp_avg_sq"):  # per parameter, shaped and typed like it (checkpoints, FSDP rely on it)
            assert ours_state[key].shape == ours_p.shape and ours_state[key].dtype == ours_p.dtype
            # relative: the moments of the eps-sized gradients are ~1e-8 and ~1e-16
            torch.testing.assert_close(ours_state[key], theirs_state[key], rtol=1e-5 if atol else 0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_adamw_is_bitwise_torch(weight_decay: float, dtype: torch.dtype):
    ours_model, theirs_model = _toy_model().to(dtype), _toy_model().to(dtype)
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours_opt = AdamW(param_groups(ours_model, weight_decay), **kwargs)  # two groups
    theirs_opt = torch.optim.AdamW(param_groups(theirs_model, weight_decay), foreach=False, **kwargs)
    _run(ours_model, ours_opt, range(50))
    _run(theirs_model, theirs_opt, range(50))
    _assert_same_run(ours_model, ours_opt, theirs_model, theirs_opt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [1e-8, 1e-30])
def test_adamw_zero_and_subnormal_moments_are_bitwise_torch(dtype: torch.dtype, eps: float):
    # rows that never get a gradient keep v = 0 (an embedding's unused tokens), and tiny gradients make subnormal v:
    # where subnormals_vanish, AdamW raises them to the smallest normal before the sqrt; eps 1e-30 (and fp16's large
    # smallest normal) rule that out
    assert subnormals_vanish(dtype, eps, (1 - 0.95) ** 0.5) == (eps == 1e-8 and dtype != torch.float16)
    ours, theirs = (nn.Parameter(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)).to(dtype))
                    for _ in range(2))
    ours_opt = AdamW([{"params": [ours]}], lr=1e-2, betas=(0.9, 0.95), eps=eps)
    theirs_opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=eps, weight_decay=0.0, foreach=False)
    for step in range(8):
        grad = torch.randn(64, 16, generator=torch.Generator().manual_seed(step))
        grad[:40] = 0  # never used
        grad[40:48] *= 1e-21  # squares below the smallest normal float
        grad[48:56] *= 1e-21 if step % 2 else 1e-3  # moments that decay from normal into that range
        ours.grad, theirs.grad = grad.to(dtype), grad.to(dtype)
        ours_opt.step()
        theirs_opt.step()
        # equal_nan: fp16 holds eps = 1e-30 as 0, so 0 / 0 on both sides
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True, msg=f"step {step}")
        assert torch.equal(ours_opt.state[ours]["exp_avg_sq"], theirs_opt.state[theirs]["exp_avg_sq"])
    if dtype == torch.float32:  # the cases the clamp exists for did occur
        v = theirs_opt.state[theirs]["exp_avg_sq"]
        assert (v == 0).any() and ((v > 0) & (v < torch.finfo(dtype).tiny)).any()


def test_adamw_is_close_to_torch_fused():
    # measured on torch 2.13 CPU over the 50 steps: fused=True differs by <= 1.2e-7
    ours_model, theirs_model = _toy_model(), _toy_model()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ours_opt = AdamW(param_groups(ours_model, weight_decay=0.1), **kwargs)
    theirs_opt = torch.optim.AdamW(param_groups(theirs_model, weight_decay=0.1), fused=True, **kwargs)
    _run(ours_model, ours_opt, range(50))
    _run(theirs_model, theirs_opt, range(50))
    _assert_same_run(ours_model, ours_opt, theirs_model, theirs_opt, atol=1e-6)


def test_adamw_on_dtensors_is_bitwise_torch(tmp_path):
    # FSDP2's parameters are DTensors: their denominator can't use the plain scratch buffer (a one-rank mesh here)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        ours_model, theirs_model = _toy_model(), _toy_model()
        for name, p in list(ours_model.named_parameters()):
            module_name, _, attr = name.rpartition(".")
            dtensor = nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]))
            setattr(ours_model.get_submodule(module_name), attr, dtensor)
        ours_opt = AdamW(param_groups(ours_model, weight_decay=0.1), lr=1e-2)
        theirs_opt = torch.optim.AdamW(param_groups(theirs_model, weight_decay=0.1), lr=1e-2, foreach=False)
        for step in range(6):
            _run(theirs_model, theirs_opt, range(step, step + 1))
            for ours_p, theirs_p in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
                ours_p.grad = None if theirs_p.grad is None else distribute_tensor(theirs_p.grad, mesh, [Shard(0)])
            set_lr(ours_opt, theirs_opt.param_groups[0]["lr"])
            ours_opt.step()
        for ours_p, theirs_p in zip(ours_model.parameters(), theirs_model.parameters(), strict=True):
            assert isinstance(ours_p, DTensor) and isinstance(ours_opt.state[ours_p]["exp_avg"], DTensor)
            assert torch.equal(ours_p.full_tensor(), theirs_p)
            theirs_exp_avg_sq = theirs_opt.state[theirs_p]["exp_avg_sq"]
            assert torch.equal(ours_opt.state[ours_p]["exp_avg_sq"].full_tensor(), theirs_exp_avg_sq)
    finally:
        dist.destroy_process_group()


def test_adamw_state_dict_resume_is_exact(tmp_path):
    ours_model = _toy_model()
    ours_opt = AdamW(param_groups(ours_model, weight_decay=0.1), lr=1e-2)
    _run(ours_model, ours_opt, range(50))

    half_model = _toy_model()
    half_opt = AdamW(param_groups(half_model, weight_decay=0.1), lr=1e-2)
    _run(half_model, half_opt, range(20))
    torch.save({"model": half_model.state_dict(), "optimizer": half_opt.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model = _toy_model()
    resumed_model.load_state_dict(ckpt["model"])
    resumed_opt = AdamW(param_groups(resumed_model, weight_decay=0.1), lr=1.0)  # lr/betas come from the checkpoint
    resumed_opt.load_state_dict(ckpt["optimizer"])
    _run(resumed_model, resumed_opt, range(20, 50))
    for ours_p, resumed_p in zip(ours_model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(ours_p, resumed_p)


def test_adamw_state_dict_crosses_with_torchs(tmp_path):
    # the layout of torch.optim.Optimizer.state_dict both ways: torch's AdamW resumes from ours, ours from torch's
    def kwargs(cls) -> dict:
        return dict(foreach=False) if cls is torch.optim.AdamW else {}

    for first, second in ((AdamW, torch.optim.AdamW), (torch.optim.AdamW, AdamW)):
        whole_model = _toy_model()
        whole_opt = torch.optim.AdamW(param_groups(whole_model, weight_decay=0.1), lr=1e-2, foreach=False)
        _run(whole_model, whole_opt, range(30))

        half_model = _toy_model()
        half_opt = first(param_groups(half_model, weight_decay=0.1), lr=1e-2, **kwargs(first))
        _run(half_model, half_opt, range(12))
        torch.save({"model": half_model.state_dict(), "optimizer": half_opt.state_dict()}, tmp_path / "ckpt.pt")
        ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        resumed_model = _toy_model()
        resumed_model.load_state_dict(ckpt["model"])
        resumed_opt = second(param_groups(resumed_model, weight_decay=0.1), lr=1.0, **kwargs(second))
        resumed_opt.load_state_dict(ckpt["optimizer"])
        _run(resumed_model, resumed_opt, range(12, 30))
        for whole_p, resumed_p in zip(whole_model.parameters(), resumed_model.parameters(), strict=True):
            assert torch.equal(whole_p, resumed_p), (first.__module__, second.__module__)


def test_adamw_refuses_the_state_of_other_parameters():
    opt = AdamW(param_groups(_toy_model(), weight_decay=0.1), lr=1e-2)
    other = nn.Sequential(nn.Embedding(50, 32), nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 51))
    other_opt = AdamW(param_groups(other, weight_decay=0.1), lr=1e-2)
    _run(other, other_opt, range(3))
    with pytest.raises(ValueError, match="does not match its shape"):
        opt.load_state_dict(other_opt.state_dict())
    with pytest.raises(ValueError, match="groups differ in size"):
        opt.load_state_dict(AdamW(param_groups(nn.Linear(2, 2), weight_decay=0.1), lr=1e-2).state_dict())


def test_a_run_never_imports_the_compiler(toy_model, tmp_path):
    # torch.optim.Optimizer's methods, the meta device and torch.distributed.tensor import torch._dynamo or sympy:
    # ~70 MB of resident memory and a second of start-up that a run without torch.compile or FSDP should not pay
    # (torch.utils.checkpoint imports them too: a run with gradient checkpointing pays them)
    run = ("import runpy, sys\n"
           "sys.argv = ['minirlhf.ppo', *sys.argv[1:]]\n"
           "try:\n    runpy.run_module('minirlhf.ppo', run_name='__main__')\n"
           "finally:\n    print('imported:', sorted({'torch._dynamo', 'sympy'} & set(sys.modules)))\n")
    result = subprocess.run([sys.executable, "-c", run, "--sft_model_path", str(toy_model),
                             "--reward_model_path", str(toy_model),  # a new score head: the reward and value models
                             "--dataset_name", "configs/toytask/prompts", "--output_dir", str(tmp_path / "out"),
                             "--per_device_train_batch_size", "8", "--total_episodes", "16", "--response_length", "4",
                             "--num_sample_generations", "0", "--save_steps", "1", "--disable_tqdm", "true",
                             "--gradient_checkpointing", "false"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").exists()  # state_dict, as checkpoints take it
    assert result.stdout.strip().splitlines()[-1] == "imported: []", result.stdout[-2000:]


# ----------------------------------------------------------------------------- weight-decay groups

_TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4)
_FAMILIES = {
    "gpt2": transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": transformers.GPTNeoXConfig(**_TINY),
    "llama": transformers.LlamaConfig(**_TINY, num_key_value_heads=2, attention_bias=True),
    "qwen2": transformers.Qwen2Config(**_TINY, num_key_value_heads=2),
    "qwen3": transformers.Qwen3Config(**_TINY, num_key_value_heads=2, head_dim=8),  # has q_norm / k_norm
    "mistral": transformers.MistralConfig(**_TINY, num_key_value_heads=2),
}


@pytest.mark.parametrize("head", ["causal_lm", "seq_cls"])
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_param_groups_match_trainer(family: str, head: str):
    config = _FAMILIES[family]
    config.pad_token_id = 0
    auto = transformers.AutoModelForCausalLM if head == "causal_lm" else transformers.AutoModelForSequenceClassification
    model = auto.from_config(config)
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen parameters belong to neither group
    names = {id(p): n for n, p in model.named_parameters()}

    ours_groups = param_groups(model, weight_decay=0.1)
    ours_decay = [names[id(p)] for p in ours_groups[0]["params"]]
    ours_no_decay = [names[id(p)] for p in ours_groups[1]["params"]]

    # Trainer.create_optimizer: decay iff the name is in get_decay_parameter_names (which does not read `self`)
    decay_names = set(Trainer.get_decay_parameter_names(None, model))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    theirs_decay = [n for n, _ in trainable if n in decay_names]
    theirs_no_decay = [n for n, _ in trainable if n not in decay_names]

    assert ours_decay == theirs_decay
    assert ours_no_decay == theirs_no_decay
    assert ours_groups[0]["weight_decay"] == 0.1 and ours_groups[1]["weight_decay"] == 0.0
    if family == "llama":  # the name rules were exercised, not just the LayerNorm type rule
        assert any(n.endswith("q_proj.bias") for n in ours_no_decay)
    if family == "qwen3":
        assert any(n.endswith("q_norm.weight") for n in ours_no_decay)


# ----------------------------------------------------------------------------- LR schedules


@pytest.fixture(scope="module")
def training_args(tmp_path_factory) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path_factory.mktemp("out")), use_cpu=True, report_to="none")


@pytest.mark.parametrize(
    "total_steps, warmup",
    [(10, 0), (10, 3), (10, 3.0), (7, 0.1), (20, 0.25), (10, 12), (1, 0), (1, 0.5)],
)
@pytest.mark.parametrize(
    "schedule, lr_scheduler_kwargs",
    [
        ("linear", None),
        ("cosine", None),
        ("cosine", {"num_cycles": 1.0}),
        ("cosine", {"num_cycles": 2.5}),
        ("constant", None),
        ("constant_with_warmup", None),
    ],
)
def test_lr_multiplier_matches_transformers(training_args, total_steps, warmup, schedule, lr_scheduler_kwargs):
    training_args.warmup_steps = warmup
    theirs_warmup = training_args.get_warmup_steps(total_steps)
    ours_warmup = steps_from(warmup, total_steps)
    assert ours_warmup == theirs_warmup

    # peak LR 1.0, so the scheduler's LR is its multiplier; read before scheduler.step(), as Trainer 5.23 logs it
    param = nn.Parameter(torch.zeros(1))
    theirs_opt = torch.optim.SGD([param], lr=1.0)
    scheduler = get_scheduler(schedule, theirs_opt, theirs_warmup, total_steps, lr_scheduler_kwargs)
    kwargs = schedule_kwargs(schedule, lr_scheduler_kwargs)
    for step in range(total_steps + 3):  # a few steps past the end too
        theirs = theirs_opt.param_groups[0]["lr"]
        ours = lr_multiplier(step, total_steps, ours_warmup, schedule, **kwargs)
        assert ours == pytest.approx(theirs, rel=0, abs=1e-12), f"step {step}"
        theirs_opt.step()
        scheduler.step()


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="'cosine_with_restarts'"):
        lr_multiplier(0, 10, 0, "cosine_with_restarts")
    with pytest.raises(ValueError, match=r"\['num_cycles'\].*'linear'"):
        schedule_kwargs("linear", {"num_cycles": 1.0})
    with pytest.raises(ValueError, match=r"\['last_epoch'\].*'cosine'"):
        schedule_kwargs("cosine", {"num_cycles": 1.0, "last_epoch": 3})
    with pytest.raises(ValueError, match="warmup_steps"):
        steps_from(-0.1, 10)
    assert schedule_kwargs("constant", None) == {}
