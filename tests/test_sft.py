"""minirlhf.sft against TRL 1.12.0's SFTTrainer on the shipped toy task: the same tokens and labels from the same
prompt-completion rows, and the same completion-only loss (fp32, 1e-6); then a short command-line run, and two
ranks (DDP and FSDP2) against one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minirlhf.data import collate_sft, prepare_sft_dataset
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.losses import completion_loss
from minirlhf.model import CausalLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The toy task's files, plus its Llama built at random by transformers and saved with the tokenizer in hf/."""
    import transformers

    folder = tmp_path_factory.mktemp("toy")
    shutil.copytree(ROOT / "configs" / "toytask", folder, dirs_exist_ok=True)
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(folder / "model")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder / "hf")
    transformers.AutoTokenizer.from_pretrained(folder / "model").save_pretrained(folder / "hf")
    return folder


def test_completion_loss_matches_trl(toy, tmp_path):
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (toy / "sft" / "train.jsonl").read_text().splitlines()[:8]]
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(toy / "hf", attn_implementation="eager")
    trainer = SFTTrainer(model=theirs_model, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=transformers.AutoTokenizer.from_pretrained(toy / "hf"),
                         args=SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none", max_length=64))
    theirs_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    theirs_loss = trainer.compute_loss(theirs_model.train(), dict(theirs_batch))

    tokenizer = Tokenizer.from_pretrained(toy / "hf")
    examples, n_dropped = prepare_sft_dataset(rows, tokenizer, max_length=64)
    ours_batch = collate_sft(examples[:4], tokenizer.pad_token_id)
    assert n_dropped == 0
    for key in ("input_ids", "attention_mask", "labels"):
        torch.testing.assert_close(ours_batch[key], theirs_batch[key], rtol=0, atol=0, msg=key)
    assert (ours_batch["labels"] == -100).any() and (ours_batch["labels"] != -100).any()  # prompts are masked
    ours_model = load_pretrained(CausalLM, str(toy / "hf"))
    labels = ours_batch["labels"]
    logprobs, _ = ours_model(ours_batch["input_ids"], ours_batch["attention_mask"], targets=labels[:, 1:].clamp(min=0))
    torch.testing.assert_close(completion_loss(logprobs, labels), theirs_loss.detach(), rtol=1e-6, atol=1e-6)

    # divided by the targets of a whole accumulation window instead, as transformers does with num_items_in_batch
    theirs_window = theirs_model(**theirs_batch, num_items_in_batch=torch.tensor(50)).loss
    torch.testing.assert_close(completion_loss(logprobs, labels, 50), theirs_window.detach(), rtol=1e-6, atol=1e-6)


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "minirlhf.sft", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


@pytest.mark.slow
def test_cli_trains_and_saves(toy, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((toy / "sft" / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    config = tmp_path / "sft.toml"
    config.write_text(f'model_name_or_path = "{toy / "model"}"\ndataset_name = "{data}"\n'
                      f'output_dir = "{tmp_path / "out"}"\nper_device_train_batch_size = 4\n'
                      "gradient_accumulation_steps = 2\nnum_train_epochs = 2\nlearning_rate = 1e-3\n"
                      "logging_steps = 1\nsave_steps = 2\ndisable_tqdm = true\n")
    result = run_cli([str(config)])
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "out"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # 16 rows / 4 per batch / 2 per step, 2 epochs
    assert set(metrics[0]) == {"loss", "grad_norm", "learning_rate", "epoch", "step"}
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "config.toml", "checkpoint-2/optimizer.pt"):
        assert (out / name).is_file(), name
    load_pretrained(CausalLM, str(out))

    result = run_cli([str(config), "--dataset_name", str(toy / "prompts" / "train.jsonl"), "--output_dir",
                      str(tmp_path / "other")])  # out holds the finished run: refused before the data is read
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {toy / 'prompts' / 'train.jsonl'} [train]: line 1: missing "
                                                  "column 'completion' (columns: ['prompt'])"]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", ["none", "full_shard"])
def test_torchrun_two_ranks_equal_one_process(toy, tmp_path, fsdp):
    """Two ranks of 2 rows each (DDP, or FSDP2) step on the same global batches as one process of 4 rows: the same
    losses, gradient norms and final weights (1e-5)."""
    from safetensors.torch import load_file

    data = tmp_path / "sft.jsonl"
    data.write_text("".join((toy / "sft" / "train.jsonl").read_text().splitlines(keepends=True)[:16]))
    common = ["--model_name_or_path", str(toy / "model"), "--dataset_name", str(data), "--num_train_epochs", "2",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
              "--save_strategy", "no", "--disable_tqdm", "true", "--max_grad_norm", "0.5"]
    one = run_cli([*common, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "minirlhf.sft", *common, "--output_dir", str(tmp_path / "two"),
                          "--per_device_train_batch_size", "2", "--fsdp", fsdp], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert two.returncode == 0, two.stderr[-3000:]
    assert ("FSDP2 full_shard: rank 0 holds" in two.stdout) == (fsdp != "none")
    one_metrics, two_metrics = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text()
                                 .splitlines()] for run in ("one", "two"))
    assert [m["step"] for m in two_metrics] == [1, 2, 3, 4]
    for a, b in zip(one_metrics, two_metrics, strict=True):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    one_w, two_w = (load_file(tmp_path / run / "model.safetensors") for run in ("one", "two"))
    assert set(one_w) == set(two_w)
    for name, tensor in one_w.items():
        torch.testing.assert_close(two_w[name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_eval_only_matches_trl_evaluate(toy, tmp_path):
    """`--do_train false` on a test split of 6 rows in batches of 4 (a short last batch) reports SFTTrainer.evaluate's
    eval_loss, eval_entropy and eval_mean_token_accuracy (fp32, 1e-5), and trains and saves nothing."""
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    data = tmp_path / "data"
    data.mkdir()
    rows = [json.loads(line) for line in (toy / "sft" / "test.jsonl").read_text().splitlines()[:6]]
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = SFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(toy / "hf",
                                                                                 attn_implementation="eager"),
                         train_dataset=datasets.Dataset.from_list(rows), eval_dataset=datasets.Dataset.from_list(rows),
                         processing_class=transformers.AutoTokenizer.from_pretrained(toy / "hf"),
                         args=SFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none",
                                        max_length=64, per_device_eval_batch_size=4))
    theirs = trainer.evaluate()

    out = tmp_path / "out"
    result = run_cli(["--model_name_or_path", str(toy / "hf"), "--dataset_name", str(data), "--do_train", "false",
                      "--per_device_eval_batch_size", "4", "--max_length", "64", "--output_dir", str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval_loss=" in result.stdout
    ours = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-5), key
    assert [p.name for p in out.iterdir()] == ["eval_results.json"]


@pytest.mark.slow
def test_cli_evaluates_on_schedule_then_eval_only_reads_the_saved_model(toy, tmp_path):
    """eval_strategy "steps" logs an eval record every eval_steps (and at the end); `--do_train false` on the saved
    model, into the run's own output_dir, reproduces the last one and leaves the run's files as they were."""
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 16), ("test", 6)):
        lines = (toy / "sft" / f"{split}.jsonl").read_text().splitlines(keepends=True)[:n]
        (data / f"{split}.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    common = ["--dataset_name", str(data), "--output_dir", str(out), "--per_device_eval_batch_size", "4",
              "--disable_tqdm", "true"]
    result = run_cli(["--model_name_or_path", str(toy / "model"), *common, "--per_device_train_batch_size", "4",
                      "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1", "--eval_strategy",
                      "steps", "--eval_steps", "2", "--save_strategy", "no"])
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 3]  # every 2 steps, and at the last
    assert set(evals[0]) == {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                              "eval_entropy", "eval_mean_token_accuracy", "epoch", "step"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    result = run_cli(["--model_name_or_path", str(out), *common, "--do_train", "false"])
    assert result.returncode == 0, result.stderr[-2000:]
    ours = json.loads((out / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_entropy", "eval_mean_token_accuracy"):
        assert ours[key] == pytest.approx(evals[-1][key], rel=1e-5, abs=1e-6), key
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "eval_results.json"} == before
