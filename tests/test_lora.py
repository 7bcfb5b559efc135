"""minirlhf.infra.lora against peft 0.21 (a test-only dependency) on a tiny random Llama, and LoRA PPO end to end.

- Our adapters, saved in PEFT's layout, load into `peft.PeftModel` on the transformers model, whose logits equal
  ours (1e-5 fp32); with adapters disabled both equal the base model; our merged model equals the unmerged one
  and peft's merge_and_unload weights (1e-5).
- A LoRA PPO run: only adapter (and value) weights train, no reference copy is built, the reference log-probs are
  the base policy's, and the outputs are an adapter peft loads and a merged model in HF layout.
"""

import json
from pathlib import Path

import pytest
import torch

from minirlhf import ppo
from minirlhf.infra.hf import hf_name, load_pretrained, save_pretrained
from minirlhf.infra.lora import adapters_disabled, add_lora, lora_layers, merged, save_adapter
from minirlhf.model import CausalLM

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    import tiny

    folder = tmp_path_factory.mktemp("lora_base")
    torch.manual_seed(0)
    tiny.hf_model("llama").save_pretrained(folder)
    return folder


def test_matches_peft(base, tmp_path):
    import peft
    import transformers

    ours = load_pretrained(CausalLM, str(base)).eval()
    names = add_lora(ours, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    assert len(names) == 6 and all(p.requires_grad == (".lora_" in n) for n, p in ours.named_parameters())
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained adapter: B away from its zero init
    save_adapter(ours, tmp_path / "adapter", str(base))

    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), tmp_path / "adapter")
    theirs.eval()
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids), theirs(ids).logits
        torch.testing.assert_close(ours_logits, theirs_logits, **TOL)
        base_logits = load_pretrained(CausalLM, str(base))(ids)
        assert (ours_logits - base_logits).abs().max() > 1e-3  # the adapter matters
        with adapters_disabled(ours), theirs.disable_adapter():
            torch.testing.assert_close(ours(ids), base_logits, **TOL)
            torch.testing.assert_close(theirs(ids).logits, base_logits, **TOL)
        torch.testing.assert_close(ours(ids), ours_logits, **TOL)  # enabled again after the block

        ours_merged = merged(ours)
        torch.testing.assert_close(ours_merged(ids), ours_logits, **TOL)
        save_pretrained(ours_merged, str(tmp_path / "merged"))
        theirs_merged = theirs.merge_and_unload()
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        for key, value in theirs_merged.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[key], value, **TOL, msg=key)


@pytest.mark.parametrize("family, targets, message", [("gpt2", ["q_proj"], "LoRA supports llama"),
                                                     ("llama", ["c_attn"], "names no Linear layer")])
def test_refuses_fused_families_and_unknown_targets(tmp_path, family, targets, message):
    import tiny

    tiny.hf_model(family).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        add_lora(load_pretrained(CausalLM, str(tmp_path)), 4, 8, 0.0, targets)


def test_lora_ppo_run(base, tmp_path, monkeypatch):
    """GRPO with LoRA on the toy task's random model: the reference log-probs equal the base model's, only adapters
    train, the adapter reloads in peft and the merged model in transformers."""
    import peft
    import transformers

    from minirlhf import rollout
    monkeypatch.chdir(ROOT)
    calls, enabled = [], []
    score_responses = rollout.score_responses

    def recording_score_responses(ref_policy, *args, **kwargs):
        with torch.no_grad():
            calls.append(ref_policy(torch.tensor([[5, 6, 7]])))  # inside the loop's adapters_disabled block
            for layer in lora_layers(ref_policy).values():
                layer.enabled = True
            enabled.append(ref_policy(torch.tensor([[5, 6, 7]])))  # the policy as it samples
            for layer in lora_layers(ref_policy).values():
                layer.enabled = False
        return score_responses(ref_policy, *args, **kwargs)

    monkeypatch.setattr(ppo, "score_responses", recording_score_responses)
    # a seeded random init, saved with its tokenizer
    start = load_pretrained(CausalLM, "configs/toytask/model", new_model=True)
    save_pretrained(start, str(tmp_path / "sft"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sft" / name).write_bytes((ROOT / "configs/toytask/model" / name).read_bytes())
    out = tmp_path / "lora"
    ppo.main(["--sft_model_path", str(tmp_path / "sft"), "--reward_model_path", "none", "--reward_funcs",
              "minirlhf.infra.toytask:gold_score", "--dataset_name", "configs/toytask/prompts", "--advantage_estimator",
              "grpo", "--num_generations", "4", "--use_peft", "true", "--lora_r", "4", "--output_dir", str(out),
              "--per_device_train_batch_size", "8", "--num_ppo_epochs", "1", "--response_length", "4",
              "--stop_token", "eos", "--num_sample_generations", "0", "--total_episodes", "16",
              "--save_strategy", "no", "--gradient_checkpointing", "false", "--learning_rate", "1e-2"])
    with torch.no_grad():
        expected = start(torch.tensor([[5, 6, 7]]))
    assert len(calls) == 2 and all(torch.equal(c, expected) for c in calls)  # both updates: the base model
    assert (enabled[1] - expected).abs().max() > 1e-4  # while the adapted policy has moved after update 1

    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 32, ["q_proj", "v_proj"])
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")  # the merged policy
    adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sft"), out)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, hf_base(ids).logits, rtol=1e-4, atol=1e-4)
        assert (hf_base(ids).logits - start(ids)).abs().max() > 1e-4  # the adapter trained
    assert not (out / "value_model").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora_r", "0"], "lora_r: must be >= 1, got 0"),
    (["--lora_dropout", "1"], "lora_dropout: must be in [0, 1), got 1.0"),
    (["--fsdp", "full_shard"], "fsdp: use_peft runs with DDP or one process, not FSDP"),
    (["--lora_target_modules", "c_attn"], "lora_target_modules: ['c_attn'] names no Linear layer of the model"),
])
def test_bad_values_are_one_line_errors(toy_model, tmp_path, flags, message):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "minirlhf.ppo", "--sft_model_path", str(toy_model),
                             "--reward_model_path", "none", "--reward_funcs", "minirlhf.infra.toytask:gold_score",
                             "--dataset_name", "configs/toytask/prompts", "--use_peft", "true",
                             "--save_strategy", "no", "--output_dir", str(tmp_path / "out"), *flags],
                            capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": ""},
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_sft_step_gradients_match_peft(base):
    """One SFT loss and its adapter gradients, ours vs peft's on the same weights and batch (1e-5)."""
    import peft
    import transformers

    from minirlhf.losses import completion_loss

    ours = load_pretrained(CausalLM, str(base)).train()
    add_lora(ours, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"),
        peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    theirs_params = dict(theirs.named_parameters())
    with torch.no_grad():  # peft's adapters take ours (A random, B made non-zero so both get gradients)
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        for name, layer in lora_layers(ours).items():
            hf = "base_model.model." + hf_name(ours.cfg, f"{name}.weight").removesuffix(".weight")
            for part in ("lora_A", "lora_B"):
                theirs_params[f"{hf}.{part}.default.weight"].copy_(getattr(layer, part).weight)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    labels = ids.masked_fill(torch.arange(9) < 4, -100)  # the first 4 tokens are the prompt
    ours_loss = completion_loss(ours(ids, targets=labels[:, 1:].clamp(min=0))[0], labels)
    theirs_loss = theirs(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(ours_loss, theirs_loss, **TOL)
    ours_loss.backward()
    theirs_loss.backward()
    for name, layer in lora_layers(ours).items():
        hf = "base_model.model." + hf_name(ours.cfg, f"{name}.weight").removesuffix(".weight")
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, part).weight.grad,
                                       theirs_params[f"{hf}.{part}.default.weight"].grad, **TOL, msg=f"{hf}.{part}")
    assert all(p.grad is None for n, p in ours.named_parameters() if ".lora_" not in n)  # the base stays frozen


def test_sft_with_lora_saves_an_adapter_peft_loads(tmp_path, monkeypatch):
    import peft
    import transformers

    from minirlhf import sft
    monkeypatch.chdir(ROOT)
    start = load_pretrained(CausalLM, "configs/toytask/model", new_model=True)
    save_pretrained(start, str(tmp_path / "base"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "base" / name).write_bytes((ROOT / "configs/toytask/model" / name).read_bytes())
    out = tmp_path / "sft"
    sft.main(["--model_name_or_path", str(tmp_path / "base"), "--dataset_name", "configs/toytask/sft",
              "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4", "--max_steps", "3",
              "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--save_strategy", "no",
              "--gradient_checkpointing", "false"])
    adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out)
    merged_model = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged_model(ids).logits, rtol=1e-4, atol=1e-4)
        assert (merged_model(ids).logits - start(ids)).abs().max() > 1e-4  # the adapter trained


def test_reward_model_with_lora_saves_an_adapter_peft_loads(tmp_path, monkeypatch):
    """minirlhf.reward with use_peft: adapters and the new score head train (the base stays frozen), and peft
    loads the adapter (LoRA + modules_to_save score) onto transformers' model equal to our merged model."""
    import peft
    import transformers

    from minirlhf import reward
    monkeypatch.chdir(ROOT)
    start = load_pretrained(CausalLM, "configs/toytask/model", new_model=True)
    save_pretrained(start, str(tmp_path / "base"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "base" / name).write_bytes((ROOT / "configs/toytask/model" / name).read_bytes())
    out = tmp_path / "rm"
    reward.main(["--model_name_or_path", str(tmp_path / "base"), "--dataset_name", "configs/toytask/preference",
                 "--output_dir", str(out), "--use_peft", "true", "--lora_r", "4", "--max_steps", "3",
                 "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--save_strategy", "no",
                 "--eval_strategy", "no", "--gradient_checkpointing", "false"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["task_type"], config["modules_to_save"]) == ("SEQ_CLS", ["score"])
    theirs_base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1)
    adapter = peft.PeftModel.from_pretrained(theirs_base, out).eval()
    merged_model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(adapter(ids).logits, merged_model(ids).logits, rtol=1e-4, atol=1e-4)
    merged_weights = merged_model.state_dict()
    adapted = ("q_proj", "v_proj", "score.weight")
    frozen = {k: v for k, v in merged_weights.items() if not any(a in k for a in adapted)}
    base_weights = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    assert all(torch.equal(v, base_weights[k]) for k, v in frozen.items())  # everything else is the base's
    assert not torch.equal(merged_weights["model.layers.0.self_attn.q_proj.weight"],
                           base_weights["model.layers.0.self_attn.q_proj.weight"])  # the adapter trained


def test_lora_ppo_run_resumes_bitwise(toy_model, tmp_path, monkeypatch):
    """LoRA PPO ("gae": the value model trains in full): a run interrupted after checkpoint-2 and resumed ends where
    the uninterrupted one does (adapter and value model bitwise, every deterministic metric); the checkpoint holds
    the adapter, not the policy."""
    from safetensors.torch import load_file
    monkeypatch.chdir(ROOT)

    def run(name: str, *flags: str) -> tuple[Path, list[dict]]:
        out = tmp_path / name
        ppo.main(["--sft_model_path", str(toy_model), "--reward_model_path", "none", "--reward_funcs",
                  "minirlhf.infra.toytask:gold_score", "--dataset_name", "configs/toytask/prompts",
                  "--use_peft", "true",
                  "--lora_r", "4", "--output_dir", str(out), "--per_device_train_batch_size", "8",
                  "--num_mini_batches", "2", "--num_ppo_epochs", "1", "--response_length", "4", "--stop_token", "eos",
                  "--num_sample_generations", "0", "--total_episodes", "32", "--save_strategy", "steps",
                  "--save_steps", "2", "--gradient_checkpointing", "false", "--learning_rate", "1e-2", *flags])
        return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, uninterrupted = run("a")
    update, calls = ppo.ppo_update, []

    def interrupted_update(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # update 3, after checkpoint-2
            raise KeyboardInterrupt
        return update(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", interrupted_update)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    monkeypatch.setattr(ppo, "ppo_update", update)
    b, metrics = run("b", "--resume_from_checkpoint", "true")
    checkpoint = sorted(p.name for p in (b / "checkpoint-2").iterdir())
    assert "adapter_model.safetensors" in checkpoint and "model.safetensors" not in checkpoint
    for file in ("adapter_model.safetensors", "value_model/model.safetensors"):
        ours, theirs = load_file(b / file), load_file(a / file)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs), file
    assert any(v.abs().max() > 0 for k, v in load_file(a / "adapter_model.safetensors").items() if "lora_B" in k)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for ours_m, theirs_m in zip(metrics, uninterrupted, strict=True):
        assert {k: v for k, v in ours_m.items() if k != "eps" and not k.startswith("time/")} == \
            {k: v for k, v in theirs_m.items() if k != "eps" and not k.startswith("time/")}


@pytest.mark.parametrize("trainer, flags", [
    ("reward", ["--dataset_name", "configs/toytask/preference", "--eval_strategy", "no", "--disable_dropout", "false"]),
    ("sft", ["--dataset_name", "configs/toytask/sft"]),
])
def test_lora_reward_and_sft_runs_resume_bitwise(tmp_path, monkeypatch, trainer, flags):
    """A LoRA reward model (adapters and the new score head train) and SFT, lora_dropout on: interrupted after
    checkpoint-2 and resumed, the adapter and metrics equal the uninterrupted run's bitwise."""
    import importlib

    from safetensors.torch import load_file
    module = importlib.import_module(f"minirlhf.{trainer}")
    monkeypatch.chdir(ROOT)

    def run(name: str, *more: str) -> tuple[Path, list[dict]]:
        out = tmp_path / name
        module.main(["--model_name_or_path", "configs/toytask/model", *flags, "--output_dir", str(out), "--use_peft",
                     "true", "--lora_r", "4", "--max_steps", "4", "--per_device_train_batch_size", "8",
                     "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "2", "--logging_steps",
                     "1", "--gradient_checkpointing", "false", *more])
        return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, uninterrupted = run("a")
    step, calls = module.optimizer_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # step 3, after checkpoint-2
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        run("b")
    monkeypatch.setattr(module, "optimizer_step", step)
    b, metrics = run("b", "--resume_from_checkpoint", "true")
    saved = load_file(b / "checkpoint-2" / "adapter_model.safetensors")
    assert ("base_model.model.score.weight" in saved) == (trainer == "reward")
    ours, theirs = load_file(b / "adapter_model.safetensors"), load_file(a / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    drop = ("train_runtime", "train_samples_per_second", "train_steps_per_second")
    assert [{k: v for k, v in m.items() if k not in drop} for m in metrics] == \
        [{k: v for k, v in m.items() if k not in drop} for m in uninterrupted]


def test_resume_across_use_peft_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A LoRA checkpoint resumed without use_peft, a full one with it, or one with another lora_r: one line, exit 2."""
    from minirlhf import sft
    monkeypatch.chdir(ROOT)
    common = ["--model_name_or_path", "configs/toytask/model", "--dataset_name", "configs/toytask/sft", "--max_steps",
              "1", "--per_device_train_batch_size", "8", "--gradient_checkpointing", "false"]
    lora = ["--use_peft", "true", "--lora_r", "4"]
    sft.main([*common, *lora, "--output_dir", str(tmp_path / "lora")])
    sft.main([*common, "--output_dir", str(tmp_path / "full")])
    for name, flags, message in [("lora", [], "holds a LoRA adapter, not a model: resume it with use_peft = true"),
                                 ("full", lora, "holds no adapter (adapter_model.safetensors)"),
                                 ("lora", ["--use_peft", "true", "--lora_r", "2"], "does not fit this model")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            sft.main([*common, *flags, "--output_dir", str(tmp_path / name), "--resume_from_checkpoint",
                      str(tmp_path / name / "checkpoint-1")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
