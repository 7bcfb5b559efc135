"""Config system: defaults and validations against TRL/transformers, PPO runtime sizes against PPOTrainer, TOML/CLI
parsing and precedence, one-line errors, --help, and the save_config round trip.

The references (`theirs_*`) are TRL 1.12's config classes, transformers 5.23's TrainingArguments checks and the sizes
TRL's PPOTrainer.__init__ computes on tiny random models.
"""

import dataclasses
import sys

import pytest
import trl
import yaml
from datasets import Dataset
from tiny import VOCAB, hf_model
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl.experimental.ppo import PPOConfig as TheirsPPOConfig
from trl.experimental.ppo import PPOTrainer
from trl.trainer.base_config import _BaseConfig

from minirlhf.infra.config import (
    ConfigError,
    TrainingConfig,
    config_help,
    config_to_toml,
    field_docs,
    parse_config,
    parse_config_or_exit,
    save_config,
)
from minirlhf.ppo import PPOConfig
from minirlhf.reward import RewardConfig

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CLASSES = [TrainingConfig, RewardConfig, PPOConfig]
# Fields whose default we change on purpose.
DELIBERATE = {"bf16": "TRL resolves None to True at construction (and fails on CPU); ours stays None = auto",
              "do_train": "transformers' False is read by example scripts alone (a Trainer trains when called); "
                          "minirlhf's main trains unless told not to"}
# Our fields that TRL's trainer config lacks: TRL's ModelConfig/ScriptArguments hold these, or (PPO) trainer attributes.
SCRIPT_FIELDS = {"model_name_or_path", "model_revision", "dtype", "dataset_name", "dataset_train_split",
                 "dataset_test_split"}
NOT_IN_TRL = {"warmup_ratio": "removed in transformers 5; accepted as the ratio form of warmup_steps",
              "sample_generations_freq": "a PPOTrainer attribute", "local_seed": "a PPOTrainer attribute",
              "metric_funcs": "minirlhf: text functions logged as objective/<name>",
              "reward_funcs": "GRPO/RLOOTrainer's argument, as import paths", "reward_weights": "GRPO/RLOO's name",
              "num_generations": "GRPO/RLOO's name; default 1, TRL's PPO", "advantage_estimator": "minirlhf",
              "value_model_path": "minirlhf: TRL's PPO takes a value model object",
              "overwrite_output_dir": "transformers 4.x (removed in 5): start afresh over another run",
              "on_nonfinite": "minirlhf: stop or skip at a nan/inf loss or gradient norm",
              "padding_free": "minirlhf: packed forwards", "shared_prefix": "minirlhf: a pair prompt once"}
# TRL's ModelConfig fields (PPO only): compared with ModelConfig's defaults
MODEL_FIELDS = {"use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules"}


def _theirs_normalised(name, value):
    return "none" if name == "report_to" and value == [] else value  # transformers turns "none" into []


@pytest.mark.parametrize("ours_cls, theirs_cls", [(TrainingConfig, _BaseConfig), (RewardConfig, trl.RewardConfig),
                                                  (PPOConfig, TheirsPPOConfig)])
def test_defaults_match_trl(ours_cls, theirs_cls, tmp_path):
    ours = ours_cls(output_dir=str(tmp_path))
    theirs = theirs_cls(output_dir=str(tmp_path), use_cpu=True)  # use_cpu: TRL's bf16=True default fails on CPU
    theirs_script = {**vars(trl.ModelConfig()), **vars(trl.ScriptArguments())}
    theirs_names = {f.name for f in dataclasses.fields(theirs_cls)}
    ours_names = {f.name for f in dataclasses.fields(ours_cls)}
    assert ours_names - theirs_names == SCRIPT_FIELDS | ((set(NOT_IN_TRL) | MODEL_FIELDS) & ours_names)
    for name in sorted(ours_names - set(DELIBERATE) - set(NOT_IN_TRL)):
        theirs_value = theirs_script[name] if name in SCRIPT_FIELDS | MODEL_FIELDS else getattr(theirs, name)
        assert getattr(ours, name) == _theirs_normalised(name, theirs_value), name
    assert ours.bf16 is None and theirs.bf16 is True
    for name, value in ours_cls.trl_defaults_only.items():  # TRL keys we accept only at TRL's default
        assert getattr(theirs, name) == value, name


# ---------------------------------------------------------------------------------------------------------------------
# Validations: the TrainingArguments checks (transformers training_args.py), compared with transformers itself


@pytest.mark.parametrize("kwargs", [
    {"logging_steps": 2.5}, {"logging_steps": 0}, {"save_steps": 2.5}, {"eval_strategy": "steps", "eval_steps": 2.5},
    {"bf16": True, "fp16": True}, {"warmup_steps": -1}, {"lr_scheduler_type": "bogus"},
    {"eval_strategy": "sometimes"}, {"save_strategy": "sometimes"}, {"logging_strategy": "sometimes"},
])
def test_rejected_like_transformers(kwargs, tmp_path):
    with pytest.raises(ValueError):
        _BaseConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    with pytest.raises(ConfigError) as e:
        TrainingConfig(**kwargs)
    assert e.value.key in kwargs and str(e.value).startswith(e.value.key)


@pytest.mark.parametrize("kwargs", [
    {"logging_steps": 0.5}, {"logging_steps": 20.0}, {"save_steps": 0.25}, {"eval_strategy": "steps"},
    {"eval_strategy": "steps", "eval_steps": 7.0, "save_steps": 14}, {"warmup_steps": 0.1},
])
def test_accepted_like_transformers(kwargs, tmp_path):
    theirs = _BaseConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    ours = TrainingConfig(**kwargs)
    for name in ("logging_steps", "eval_steps", "save_steps", "warmup_steps"):
        assert getattr(ours, name) == getattr(theirs, name), name
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name  # 20.0 -> 20, as transformers


def test_warmup_ratio_becomes_warmup_steps():
    assert TrainingConfig(warmup_ratio=0.1).warmup_steps == 0.1
    with pytest.raises(ConfigError, match="warmup_ratio"):
        TrainingConfig(warmup_ratio=0.1, warmup_steps=5)


# ---------------------------------------------------------------------------------------------------------------------
# PPO runtime sizes: ours vs what TRL's PPOTrainer.__init__ computes (world size 1)


def _theirs_ppo_trainer(tmp_path, n_prompts: int, **kwargs):
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t2")
    args = TheirsPPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
    return PPOTrainer(args=args, processing_class=tokenizer, model=hf_model("gpt2"),
                      ref_model=hf_model("gpt2"), reward_model=hf_model("gpt2", "seq_cls"),
                      value_model=hf_model("gpt2", "seq_cls"),
                      train_dataset=Dataset.from_dict({"input_ids": [[3, 4, 5]] * n_prompts}))


RUNTIME = ["local_batch_size", "batch_size", "local_mini_batch_size", "total_episodes", "num_total_batches"]


@pytest.mark.parametrize("n_prompts, kwargs", [
    (8, dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_mini_batches=2)),
    (8, dict(per_device_train_batch_size=4)),
    (10, dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, num_mini_batches=3, total_episodes=7,
              num_sample_generations=0)),
    (5, dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_mini_batches=2, whiten_rewards=True,
             num_train_epochs=1.5, num_sample_generations=3, seed=7)),
])
def test_ppo_runtime_sizes_match_trl(n_prompts, kwargs, tmp_path):
    theirs = _theirs_ppo_trainer(tmp_path, n_prompts, **kwargs)
    ours = PPOConfig(**kwargs)
    ours.set_runtime_sizes(world_size=1, train_dataset_len=n_prompts)
    for name in RUNTIME:
        assert getattr(ours, name) == getattr(theirs.args, name), name
    assert ours.sample_generations_freq == getattr(theirs, "sample_generations_freq", None)
    assert ours.local_seed == theirs.local_seed


@pytest.mark.parametrize("n_prompts, kwargs", [
    (8, dict(per_device_train_batch_size=4, gradient_accumulation_steps=4, num_mini_batches=3)),  # 16 % 3
    (8, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, whiten_rewards=True)),  # mini 4 < 8
])
def test_ppo_runtime_size_errors_match_trl(n_prompts, kwargs, tmp_path):
    with pytest.raises((ValueError, AssertionError)):
        _theirs_ppo_trainer(tmp_path, n_prompts, **kwargs)
    with pytest.raises(ConfigError) as e:
        PPOConfig(**kwargs).set_runtime_sizes(world_size=1, train_dataset_len=n_prompts)
    assert e.value.key in kwargs


@pytest.mark.parametrize("kwargs", [dict(stop_token="eot"), dict(stop_token="eos", stop_token_id=5),
                                    dict(kl_estimator="k2")])
def test_ppo_config_errors_match_trl(kwargs, tmp_path):
    with pytest.raises(ValueError):  # TRL checks these in PPOTrainer.__init__, we when the config is built
        _theirs_ppo_trainer(tmp_path, 8, **kwargs)
    with pytest.raises(ConfigError) as e:
        PPOConfig(**kwargs)
    assert e.value.key in kwargs


# ---------------------------------------------------------------------------------------------------------------------
# Parsing: TOML file, then flags


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return str(path)


def test_precedence_defaults_file_flags(tmp_path):
    path = _write(tmp_path, 'learning_rate = 1e-5\nseed = 1\nlr_scheduler_type = "cosine"\nmax_length = "none"\n')
    cfg = parse_config(RewardConfig, [path, "--learning_rate", "2e-5", "--lr-scheduler-type=constant", "--bf16"])
    assert cfg.learning_rate == 2e-5 and cfg.lr_scheduler_type == "constant" and cfg.bf16 is True  # flags win
    assert cfg.seed == 1 and cfg.max_length is None  # from the file
    assert cfg.per_device_train_batch_size == 8 and cfg.disable_dropout is True  # defaults
    assert parse_config(RewardConfig, []) == RewardConfig()


@pytest.mark.parametrize("flag, value, expected", [
    ("bf16", "no", False), ("bf16", "none", None), ("disable_dropout", "0", False), ("fp16", "YES", True),
    ("num_train_epochs", "2", 2.0), ("max_steps", "-1", -1), ("eos_token", "null", None), ("eos_token", "</s>", "</s>"),
    ("lr_scheduler_kwargs", '{"num_cycles": 1}', {"num_cycles": 1}), ("resume_from_checkpoint", "true", True),
    ("resume_from_checkpoint", "out/checkpoint-5", "out/checkpoint-5"), ("center_rewards_coefficient", "1e-2", 0.01),
])
def test_flag_values_parsed_by_field_type(flag, value, expected):
    kwargs = {"lr_scheduler_type": "cosine"} if flag == "lr_scheduler_kwargs" else {}
    args = [f"--{k}={v}" for k, v in kwargs.items()]
    got = getattr(parse_config(RewardConfig, [*args, f"--{flag}", value]), flag)
    assert got == expected and type(got) is type(expected)


def test_toml_values_typed(tmp_path):
    text = 'num_train_epochs = 2\nlr_scheduler_type = "cosine"\nlr_scheduler_kwargs = {num_cycles = 1.5}\n'
    cfg = parse_config(RewardConfig, [_write(tmp_path, text)])
    assert cfg.num_train_epochs == 2.0 and type(cfg.num_train_epochs) is float
    assert cfg.lr_scheduler_kwargs == {"num_cycles": 1.5}


ERRORS = [  # (class, file text or None, flags, words the one-line message must contain)
    (RewardConfig, "learning_rat = 1e-5\n", [], ["cfg", "learning_rat", "did you mean 'learning_rate'"]),
    (RewardConfig, None, ["--gradient_accumulation_step", "4"], ["command line", "'gradient_accumulation_steps'"]),
    (RewardConfig, None, ["--max_steps", "1.5"], ["command line", "max_steps", "expected int"]),
    (RewardConfig, 'seed = "x"\n', [], ["cfg", "seed", "expected int"]),
    (RewardConfig, "bf16 = true\n", ["--fp16", "true"], ["cfg", "bf16", "fp16"]),
    (RewardConfig, "logging_steps = 2.5\n", [], ["cfg", "logging_steps", "whole number"]),
    (RewardConfig, None, ["--warmup_ratio", "0.1", "--warmup_steps", "5"], ["command line", "warmup_ratio"]),
    (RewardConfig, None, ["--lr_scheduler_type", "polynomial"], ["lr_scheduler_type", "polynomial"]),
    (RewardConfig, None, ["--lr_scheduler_kwargs", '{"power": 2}'], ["command line", "lr_scheduler_kwargs"]),
    (RewardConfig, None, ["--save_strategy", "best"], ["save_strategy", "best"]),
    (RewardConfig, None, ["--max_length", "0"], ["max_length"]),
    (RewardConfig, None, ["--chat_template_path", "some/tokenizer"], ["chat_template_path"]),
    (RewardConfig, None, ["--trust_remote_code", "true"], ["trust_remote_code", "not implemented"]),
    (RewardConfig, None, ["--dataset_num_proc", "4"], ["dataset_num_proc", "only TRL's default none"]),
    (RewardConfig, None, ["--seed"], ["command line", "seed", "missing value"]),
    (RewardConfig, "[training]\nseed = 1\n", [], ["cfg", "training", "unknown key"]),
    (RewardConfig, "seed = \n", [], ["cfg", "invalid TOML"]),
    (PPOConfig, None, ["--batch_size", "2"], ["command line", "batch_size", "filled at runtime"]),
    (PPOConfig, None, ["--push_to_hub"], ["push_to_hub", "not implemented"]),
    (PPOConfig, "kl_estimator = \"k2\"\n", [], ["cfg", "kl_estimator", "k2"]),
    (PPOConfig, None, ["--do_train", "false"], ["command line", "do_train", "no evaluation loop"]),
    (RewardConfig, None, ["--do_train", "false", "--resume_from_checkpoint", "true"], ["resume_from_checkpoint"]),
]


@pytest.mark.parametrize("cls, text, flags, words", ERRORS)
def test_errors_are_one_line_and_name_the_key(cls, text, flags, words, tmp_path):
    argv = ([_write(tmp_path, text)] if text is not None else []) + flags
    with pytest.raises(ConfigError) as e:
        parse_config(cls, argv)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_file_and_exit_code(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config_or_exit(RewardConfig, ["does/not/exist.toml"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: does/not/exist.toml: ") and err.count("\n") == 1


def test_accepted_trl_keys_at_their_defaults(tmp_path):
    cfg = parse_config(PPOConfig, [_write(tmp_path, "push_to_hub = false\nds3_gather_for_generation = true\n"),
                                   "--dataset_num_proc", "none"])
    assert cfg == PPOConfig()


# ---------------------------------------------------------------------------------------------------------------------
# --help


def _type_text(tp) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("NoneType", "None")


@pytest.mark.parametrize("cls", CLASSES)
def test_help_lists_every_field_once(cls, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(cls, ["--seed", "3", "--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert "\n".join(lines) == config_help(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{f.name} has no docstring"
        if not f.init:
            assert sum(line.startswith(f"  {f.name}: ") for line in lines) == 1
            continue
        [i] = [i for i, line in enumerate(lines) if line.startswith(f"  --{f.name} ")]
        head, default = lines[i].split(" (default: ")
        assert head == f"  --{f.name} {_type_text(f.type)}"
        default_value = tomllib.loads(f"x = {default[:-1]}")["x"] if default != "none)" else None
        assert default_value == f.default, f.name
        assert lines[i + 1].strip() == docs[f.name]
    assert docs["learning_rate"] != field_docs(TrainingConfig)["learning_rate"] or cls is TrainingConfig


# ---------------------------------------------------------------------------------------------------------------------
# save_config round trip, and TRL YAML configs converted to TOML by syntax alone


def test_save_config_round_trip(tmp_path):
    cfg = RewardConfig(max_length=None, lr_scheduler_type="cosine", lr_scheduler_kwargs={"num_cycles": 0.25},
                       warmup_steps=0.1, resume_from_checkpoint=True, learning_rate=1e-5, bf16=False,
                       eval_strategy="steps", eval_steps=0.5, save_total_limit=2, seed=7, eos_token="<|im_end|>",
                       run_name='quote " back\\slash\nnewline \t tab ünï 😀 \x7f \x01', output_dir=str(tmp_path))
    path = tmp_path / "sub" / "config.toml"
    save_config(cfg, path)
    assert tomllib.loads(path.read_text())["run_name"] == cfg.run_name  # valid TOML to tomllib
    assert parse_config(RewardConfig, [str(path)]) == cfg

    ppo = PPOConfig(stop_token="eos", missing_eos_penalty=1.0, resume_from_checkpoint="out/checkpoint-3")
    ppo.set_runtime_sizes(world_size=1, train_dataset_len=16)
    text = config_to_toml(ppo)
    assert "# batch_size = 8  (filled at runtime)" in text
    back = parse_config(PPOConfig, [_write(tmp_path, text)])
    assert all(getattr(back, f.name) == getattr(ppo, f.name) for f in dataclasses.fields(PPOConfig) if f.init)


# TRL's documented commands (examples/scripts/reward_modeling.py, ppo/ppo.py), as a TRL YAML config and the same by
# syntax in TOML
YAML_TOML = {
    RewardConfig: ("""
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
output_dir: Qwen2-0.5B-Reward
per_device_train_batch_size: 8
num_train_epochs: 1
learning_rate: 1.0e-5
eval_strategy: steps
eval_steps: 50
max_length: 2048
lr_scheduler_type: cosine
lr_scheduler_kwargs: {"num_cycles": 0.25}
warmup_steps: 0.1
center_rewards_coefficient: 0.01
bf16: false
report_to: none
trust_remote_code: false
""", """
model_name_or_path = "Qwen/Qwen2-0.5B-Instruct"
dataset_name = "trl-lib/ultrafeedback_binarized"
output_dir = "Qwen2-0.5B-Reward"
per_device_train_batch_size = 8
num_train_epochs = 1
learning_rate = 1.0e-5
eval_strategy = "steps"
eval_steps = 50
max_length = 2048
lr_scheduler_type = "cosine"
lr_scheduler_kwargs = {"num_cycles" = 0.25}
warmup_steps = 0.1
center_rewards_coefficient = 0.01
bf16 = false
report_to = "none"
trust_remote_code = false
"""),
    PPOConfig: ("""
dataset_name: trl-internal-testing/descriptiveness-sentiment-trl-style
dataset_train_split: descriptiveness
learning_rate: 3.0e-6
num_ppo_epochs: 1
num_mini_batches: 1
output_dir: models/minimal/ppo
per_device_train_batch_size: 64
gradient_accumulation_steps: 1
total_episodes: 10000
model_name_or_path: EleutherAI/pythia-1b-deduped
sft_model_path: EleutherAI/pythia-1b-deduped
reward_model_path: EleutherAI/pythia-1b-deduped
missing_eos_penalty: 1.0
stop_token: eos
bf16: false
push_to_hub: false
""", """
dataset_name = "trl-internal-testing/descriptiveness-sentiment-trl-style"
dataset_train_split = "descriptiveness"
learning_rate = 3.0e-6
num_ppo_epochs = 1
num_mini_batches = 1
output_dir = "models/minimal/ppo"
per_device_train_batch_size = 64
gradient_accumulation_steps = 1
total_episodes = 10000
model_name_or_path = "EleutherAI/pythia-1b-deduped"
sft_model_path = "EleutherAI/pythia-1b-deduped"
reward_model_path = "EleutherAI/pythia-1b-deduped"
missing_eos_penalty = 1.0
stop_token = "eos"
bf16 = false
push_to_hub = false
"""),
}


@pytest.mark.parametrize("ours_cls, theirs_cls", [(RewardConfig, trl.RewardConfig), (PPOConfig, TheirsPPOConfig)])
def test_trl_yaml_config_as_toml(ours_cls, theirs_cls, tmp_path):
    yaml_text, toml_text = YAML_TOML[ours_cls]
    assert yaml.safe_load(yaml_text) == tomllib.loads(toml_text)  # the conversion kept every value
    yaml_path = tmp_path / "config.yaml"
    yaml_path.write_text(yaml_text)
    parser = trl.TrlParser((theirs_cls, trl.ScriptArguments, trl.ModelConfig))
    theirs = {}
    for part in parser.parse_args_and_config(args=["--config", str(yaml_path)]):
        theirs.update(vars(part))
    ours = parse_config(ours_cls, [_write(tmp_path, toml_text)])
    for key in yaml.safe_load(yaml_text):
        ours_value = getattr(ours, key, ours_cls.trl_defaults_only.get(key))
        assert ours_value == _theirs_normalised(key, theirs[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# Fields a trainer does not use are refused, not ignored; text functions are imported at parse time


@pytest.mark.parametrize("cls, key, value", [
    (PPOConfig, "logging_steps", 5), (PPOConfig, "eval_strategy", "steps"), (PPOConfig, "dataloader_drop_last", True),
    (PPOConfig, "max_steps", 10), (PPOConfig, "do_train", False),
])
def test_unused_fields_are_refused(cls, key, value, tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(cls, [f"--{key}", str(value).lower(), "--output_dir", str(tmp_path)])
    assert e.value.key == key and str(e.value).startswith(f"command line: {key}: ") and "leave it unset" in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    parse_config(cls, [f"--{key}", str(getattr(cls(), key)).lower() if getattr(cls(), key) is not None else "none"])


def test_metric_funcs(tmp_path):
    gold = "minirlhf.infra.toytask:gold_score"
    cfg = parse_config(PPOConfig, ["--metric_funcs", f"{gold},{gold}"])
    assert cfg.metric_funcs == [gold] * 2
    toml = _write(tmp_path, f'metric_funcs = ["{gold}"]\n')
    assert parse_config(PPOConfig, [toml]).metric_funcs == [gold]
    for bad, problem in (("minirlhf.infra.toytask:nope", "cannot import"), ("nomodule:f", "No module named 'nomodule'"),
                         ("minirlhf.infra.toytask", "is not a function"),
                         ("minirlhf.infra.toytask:CATEGORIES", "not a function")):
        with pytest.raises(ConfigError, match=f"^command line: metric_funcs: .*{problem}"):
            parse_config(PPOConfig, ["--metric_funcs", bad])
    with pytest.raises(ConfigError, match="metric_funcs: expected list"):
        parse_config(PPOConfig, [_write(tmp_path, "metric_funcs = [1]\n")])
