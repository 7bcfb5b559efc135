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

    result = run_cli([str(config), "--dataset_name", str(toy / "prompts" / "train.jsonl")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {toy / 'prompts' / 'train.jsonl'} [train]: row 0: missing "
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
