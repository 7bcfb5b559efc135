"""Configuration: flat dataclasses filled from a TOML file and `--key value` flags, with TRL's names and defaults.

A config is a dataclass with a one-line docstring under each field (cleanrl); `--help` prints them. `parse_config`
fills it from an optional TOML file, then from command-line flags (torchtitan's TOML loader, nanoGPT's typed
overrides). Keys are strict: an unknown key, a value of the wrong type or an invalid combination is a one-line
`ConfigError` naming the key and where it came from. Keys are TRL's flat names, so a TRL YAML config becomes TOML by
syntax alone (`learning_rate: 1.0e-5` -> `learning_rate = 1.0e-5`, strings quoted). TOML has no null: the string
"none" (or "null") sets an optional field to None, in a file as on the command line.

References: transformers 5.23 `TrainingArguments` (training_args.py) with TRL's `_BaseConfig` overrides
(trl/trainer/base_config.py), TRL's `ModelConfig` and `ScriptArguments`. bf16 "auto" is resolved by
`run.resolve_precision` (it depends on the device). A TrainingArguments field that a trainer does not use is in its
`unused`, refused unless left at its default.
"""

import ast
import contextlib
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from minirlhf.infra.parallel import tell_launcher
from minirlhf.optim import SCHEDULES, schedule_kwargs

STRATEGIES = ("no", "steps", "epoch")  # transformers also has save_strategy="best" (needs load_best_model_at_end)
DTYPES = ("auto", "bfloat16", "float16", "float32")  # TRL ModelConfig.dtype choices
FSDP_MODES = ("full_shard", "shard_grad_op")  # the transformers FSDPOption names minirlhf implements
REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # each an optional extra of its name; metrics.jsonl always
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
# TrainingArguments keys minirlhf leaves out on purpose (TrainingConfig's docstring): unknown keys, but no typos to
# correct (difflib would offer `seed` for `deepspeed`, `use_peft` for `use_cpu`)
LEFT_OUT = frozenset((
    "deepspeed", "accelerator_config", "fsdp_config", "optim", "optim_args", "optim_target_modules", "adafactor",
    "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_revision", "torch_compile",
    "torch_compile_backend", "torch_compile_mode", "tf32", "use_cpu", "use_liger_kernel", "label_smoothing_factor",
    "neftune_noise_alpha", "group_by_length", "auto_find_batch_size", "dataloader_num_workers",
    "dataloader_pin_memory", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "logging_dir",
    "gradient_checkpointing_kwargs", "save_only_model", "eval_on_start", "ddp_backend", "ddp_timeout",
))
C = TypeVar("C")


class ConfigError(ValueError):
    """A bad config file, key or value. The message is one line; `key` names the field (None for file errors)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def module_name(cls: type) -> str:
    """"minirlhf.reward" for RewardConfig, also under `python -m` (where Python names the module "__main__")."""
    spec = getattr(sys.modules[cls.__module__], "__spec__", None)
    return spec.name if cls.__module__ == "__main__" and spec is not None else cls.__module__


def import_function(spec: str, key: str):
    """The function named by "package.module:function", imported like any local module (never code from a model or
    dataset folder); a ConfigError naming `key` if it cannot be."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name) if module_name and name else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec!r} ({type(e).__name__}: {e})", key) from None
    require(callable(function), key, f"{spec!r} is not a function 'package.module:function'")
    return function


def require(ok: bool, key: str, problem: str) -> None:
    """Raise ConfigError("key: problem") unless `ok`; __post_init__ checks use it so the message names the key."""
    if not ok:
        raise ConfigError(f"{key}: {problem}", key)


@dataclass
class TrainingConfig:
    """The TrainingArguments fields a training loop reads, with TRL's defaults, and TRL's model/script arguments.
    The rest of TrainingArguments (DeepSpeed, hub upload, other optimizers, ...) is not a field: those keys are errors.
    """

    trl_defaults_only: ClassVar[dict[str, object]] = {}
    """TRL keys minirlhf does not implement, accepted only at TRL's default value (where they do nothing)."""
    unused: ClassVar[dict[str, str]] = {}
    """Fields below that this trainer does not read, each with the reason: an error unless left at the default."""

    # ---- model and data (TRL ModelConfig and ScriptArguments)
    model_name_or_path: str | None = None
    """local folder or Hugging Face Hub id of the model to start from"""
    model_revision: str = "main"
    """branch, tag or commit of model_name_or_path on the Hub"""
    dtype: str = "float32"
    """dtype the weights are loaded in: "float32", "bfloat16", "float16" or "auto" (as saved)"""
    dataset_name: str | None = None
    """local data file or folder, or Hub dataset id"""
    dataset_train_split: str = "train"
    """split to train on"""
    dataset_test_split: str = "test"
    """split to evaluate on (when eval_strategy is not "no", or do_train is false)"""

    # ---- batch sizes and optimisation (AdamW, linear/cosine/constant schedules)
    per_device_train_batch_size: int = 8
    """examples per rank per forward/backward (reward model: pairs, so 2x sequences)"""
    per_device_eval_batch_size: int = 8
    """examples per rank per evaluation forward"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    learning_rate: float = 5e-5
    """peak AdamW learning rate"""
    weight_decay: float = 0.0
    """decoupled AdamW weight decay, applied to matrices only (not to biases and norm weights)"""
    adam_beta1: float = 0.9
    """AdamW beta1 (first-moment decay)"""
    adam_beta2: float = 0.999
    """AdamW beta2 (second-moment decay)"""
    adam_epsilon: float = 1e-8
    """AdamW epsilon, added to the bias-corrected sqrt(v)"""
    max_grad_norm: float = 1.0
    """clip the global gradient L2 norm to this (0: no clipping; the norm is logged either way)"""
    num_train_epochs: float = 3.0
    """passes over the training set (a float allows a partial last epoch)"""
    max_steps: int = -1
    """total optimizer steps if > 0, overriding num_train_epochs"""
    lr_scheduler_type: str = "linear"
    """learning-rate schedule after warmup: one of "linear", "cosine", "constant", "constant_with_warmup" """
    lr_scheduler_kwargs: dict | None = None
    """schedule options, e.g. {num_cycles = 0.5} for cosine (a JSON object on the command line)"""
    warmup_steps: float = 0
    """linear warmup from 0: a step count if >= 1, a fraction of the total steps if in [0, 1)"""
    warmup_ratio: float | None = None
    """transformers 4.x spelling of a fractional warmup_steps, copied into it (set one of the two)"""

    # ---- logging, evaluation, checkpoints
    do_train: bool = True
    """false: evaluate model_name_or_path on dataset_test_split and exit, training nothing and writing only
    output_dir/eval_results.json (whatever else output_dir holds); the record is also printed"""
    logging_strategy: str = "steps"
    """when to log: "no", "steps" (every logging_steps) or "epoch" (at each epoch end)"""
    logging_steps: float = 10
    """log every this many optimizer steps (a value in (0, 1): that fraction of the total steps)"""
    logging_first_step: bool = False
    """also log after the first optimizer step"""
    eval_strategy: str = "no"
    """when to evaluate on dataset_test_split: "no", "steps" (every eval_steps) or "epoch" (at each epoch end)"""
    eval_steps: float | None = None
    """evaluate every this many optimizer steps (a fraction if < 1); None: logging_steps"""
    save_strategy: str = "steps"
    """when to write a checkpoint: "no", "steps" (every save_steps, and at the end) or "epoch" (at each epoch end)"""
    save_steps: float = 500
    """checkpoint every this many optimizer steps (a fraction if < 1)"""
    save_total_limit: int | None = None
    """keep only the newest this-many checkpoints in output_dir; None: keep all"""
    output_dir: str = "trainer_output"
    """folder for checkpoints, the final model, metrics.jsonl and config.toml"""
    run_name: str | None = None
    """name of the run in logs; None: output_dir"""
    report_to: str = "none"
    """tracker besides metrics.jsonl and the console: "none", "tensorboard", "wandb" or "trackio", each an optional
    extra (pip install 'minirlhf[wandb]'); where each writes: minirlhf/infra/metrics.py"""
    disable_tqdm: bool = False
    """hide the progress bar"""
    resume_from_checkpoint: bool | str | None = None
    """a checkpoint-<step> folder to resume from, or true for the newest one in output_dir"""
    overwrite_output_dir: bool = False
    """start afresh in an output_dir that holds another run (checkpoints or a final model), deleting its checkpoints
    once the new run has loaded; false: such an output_dir is an error unless resume_from_checkpoint is set, and one
    holding the finished run of this same config is left as it is (nothing to do, exit 0)"""
    on_nonfinite: str = "stop"
    """an optimizer step (PPO: each minibatch's) whose loss or gradient norm is nan/inf: "stop" (exit 1, nothing of
    it saved, last checkpoint intact) or "skip" (not stepped, counted in skipped_steps); PPO stops at nan/inf weights"""

    # ---- reproducibility and precision
    seed: int = 42
    """seed for initialisation (e.g. a new score head), dropout and sampling"""
    data_seed: int | None = None
    """seed of the training-data order; None: seed"""
    dataloader_drop_last: bool = False
    """drop the last, incomplete batch of each epoch"""
    bf16: bool | None = None
    """bf16 autocast; None (TRL's "auto"): on with a bf16-capable GPU, fp32 on CPU (TRL would fail there)"""
    fp16: bool = False
    """fp16 autocast (cannot be combined with bf16)"""
    gradient_checkpointing: bool = True
    """recompute each block's activations during backward to save memory"""
    fsdp: str | None = None
    """shard the models over ranks with FSDP2 (reward, SFT and PPO): "full_shard" (parameters, gradients and
    optimizer state; ZeRO-3) or "shard_grad_op" (parameters stay gathered between forward and backward; ZeRO-2),
    optionally followed by " auto_wrap" (each transformer block is always its own unit); None: DDP"""

    def __post_init__(self):
        # Fields this trainer does not use: refused unless left at the default (before any default is filled in below)
        for f in dataclasses.fields(self):
            if f.name in self.unused:
                require(getattr(self, f.name) == f.default, f.name, f"{self.unused[f.name]}; leave it unset")
        # do_train = false is an evaluation: refused by a trainer without one (PPO), and it has nothing to resume
        if "eval_strategy" in self.unused:
            require(self.do_train, "do_train", f"{self.unused['eval_strategy']}; leave it unset")
        require(self.do_train or self.resume_from_checkpoint in (None, False), "resume_from_checkpoint",
                "nothing to resume with do_train = false (it evaluates model_name_or_path)")
        # The checks of TrainingArguments.__post_init__ and _validate_args (training_args.py), as one-line errors.
        self.output_dir = os.path.expanduser(self.output_dir)
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)!r}")
        # Checked before anything is loaded or written (transformers finds a bad rate only at the first step, or never)
        for key in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm"):
            value, high = getattr(self, key), 1 if key.startswith("adam_beta") else math.inf
            require(math.isfinite(value) and 0 <= value < high, key, f"must be finite, >= 0, < {high}; got {value!r}")
        require(self.max_steps > 0 or (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0),
                "num_train_epochs", f"must be > 0 (or set max_steps), got {self.num_train_epochs!r}")
        for key, allowed in (("lr_scheduler_type", SCHEDULES), ("dtype", DTYPES), ("report_to", REPORT_TO),
                             ("logging_strategy", STRATEGIES), ("eval_strategy", STRATEGIES),
                             ("save_strategy", STRATEGIES), ("on_nonfinite", ("stop", "skip"))):
            require(getattr(self, key) in allowed, key, f"{getattr(self, key)!r} is not one of {allowed}")
        require(self.report_to == "none" or importlib.util.find_spec(self.report_to) is not None, "report_to",
                f"{self.report_to!r} needs the {self.report_to} package: pip install 'minirlhf[{self.report_to}]'")
        try:
            schedule_kwargs(self.lr_scheduler_type, self.lr_scheduler_kwargs)
        except ValueError as e:
            raise ConfigError(str(e), "lr_scheduler_kwargs") from None
        if self.warmup_ratio is not None:  # removed in transformers 5: becomes the ratio form of warmup_steps
            require(self.warmup_steps == 0, "warmup_ratio", "set warmup_ratio or warmup_steps, not both")
            require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")
            self.warmup_steps, self.warmup_ratio = self.warmup_ratio, None
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps!r}")
        # transformers silently truncates e.g. 2.5 to 2 warmup steps; we refuse, as it does for logging_steps.
        require(self.warmup_steps < 1 or self.warmup_steps == int(self.warmup_steps), "warmup_steps",
                f"a value >= 1 is a step count and must be a whole number, got {self.warmup_steps!r}")
        if self.eval_strategy == "steps" and not self.eval_steps:
            self.eval_steps = self.logging_steps  # transformers' fallback
        for key, strategy in (("logging_steps", self.logging_strategy), ("eval_steps", self.eval_strategy),
                              ("save_steps", self.save_strategy)):
            if strategy == "steps":
                steps = getattr(self, key)
                require(steps > 0, key, f"must be > 0 when the strategy is 'steps', got {steps!r}")
                require(steps < 1 or steps == int(steps), key, f"a value > 1 must be a whole number, got {steps!r}")
                setattr(self, key, int(steps) if steps >= 1 else steps)
        require(not (self.bf16 and self.fp16), "bf16", "bf16 and fp16 cannot both be true")
        options = (self.fsdp or "").split()
        require(not options or (options[0] in FSDP_MODES and set(options[1:]) <= {"auto_wrap"}), "fsdp",
                f"{self.fsdp!r} is not one of {FSDP_MODES}, optionally with 'auto_wrap' (no offload, no hybrid)")
        require(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
                f"must be >= 1 or none, got {self.save_total_limit!r}")


# ---------------------------------------------------------------------------------------------------------------------
# Parsing


def parse_config(cls: type[C], argv: list[str]) -> C:
    """Build `cls` from `[config.toml] [--key value | --key=value ...]`: defaults < file < flags.

    `--help` / `-h` prints every field and exits 0. A bool flag without a value means true (`--bf16`).
    """
    if "--help" in argv or "-h" in argv:
        print(config_help(cls))
        raise SystemExit(0)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = get_type_hints(cls)
    values, where = {}, {}

    def set_value(key: str, value, source: str, cli: bool) -> None:
        if key in cls.trl_defaults_only or key == "trust_remote_code":  # every trainer: TRL scripts' ModelConfig key
            default = cls.trl_defaults_only.get(key, False)
            if str(value).lower() != str(default).lower():
                why = " (it never runs code from a model folder or the Hub)" if key == "trust_remote_code" else ""
                raise ConfigError(f"{source}: {key}: not implemented in minirlhf{why}; only TRL's default "
                                  f"{_show(default)} is accepted, got {value!r}", key)
            return
        if key in LEFT_OUT and key not in fields:
            raise ConfigError(f"{source}: {key}: a TrainingArguments key not implemented in minirlhf; see --help for "
                              "the keys it has", key)
        if key not in fields:
            close = difflib.get_close_matches(key, [*fields, *cls.trl_defaults_only], n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see --help"
            raise ConfigError(f"{source}: {key}: unknown key; {hint}", key)
        if not fields[key].init:
            raise ConfigError(f"{source}: {key}: filled at runtime, cannot be set", key)
        try:
            values[key] = _convert(value, hints[key], cli)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: {e}", key) from None
        where[key] = source

    args = list(argv)
    path = args.pop(0) if args and not args[0].startswith("-") else None
    if path is not None:
        for key, value in _read_toml(path).items():
            set_value(key, value, path, cli=False)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"command line: {arg!r}: expected --key value (the config file comes first)")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            words = []  # a list key takes every word up to the next flag, as TRL's HfArgumentParser (nargs)
            while args and not args[0].startswith("--") and (not words or key in hints and _is_list(hints[key])):
                words.append(args.pop(0))
            if words:
                value = words[0] if len(words) == 1 else words
            elif (key in hints and bool in _options(hints[key])) or isinstance(cls.trl_defaults_only.get(key), bool):
                value = "true"
            else:
                raise ConfigError(f"command line: {key}: missing value", key)
        set_value(key, value, "command line", cli=True)
    try:
        return cls(**values)
    except ConfigError as e:  # a __post_init__ check: say where the offending key was set
        raise ConfigError(f"{where.get(e.key, path or 'command line')}: {e}", e.key) from None


@contextlib.contextmanager
def exit_on_bad_input():
    """Around a `main()`'s parsing and loading: a ValueError (a ConfigError, bad data, model folder or checkpoint)
    prints `error: ...` on one line to stderr and exits with status 2, as argparse does (under torchrun, the line is
    also the root cause its failure summary names)."""
    try:
        yield
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        tell_launcher(f"error: {e}")
        raise SystemExit(2) from None


def parse_config_or_exit(cls: type[C], argv: list[str] | None = None) -> C:
    with exit_on_bad_input():
        return parse_config(cls, sys.argv[1:] if argv is None else argv)


def _read_toml(path: str) -> dict:
    if Path(path).suffix in (".yaml", ".yml", ".json"):  # TRL's scripts take YAML; the keys are the same
        raise ConfigError(f"{path}: minirlhf reads TOML config files only; convert it line by line: `key: value` -> "
                          "`key = value`, strings quoted (learning_rate: 1.0e-5 -> learning_rate = 1.0e-5, "
                          'output_dir: runs/x -> output_dir = "runs/x")')
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def _options(tp) -> tuple:
    """The member types of a union (`int | None` -> (int, NoneType)), or (tp,)."""
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)


def _is_list(tp) -> bool:
    return any(get_origin(option) is list for option in _options(tp))


def _type_name(tp) -> str:
    return " | ".join("None" if t is type(None) else str(t) if get_origin(t) else t.__name__ for t in _options(tp))


def _convert(value, tp, cli: bool):
    """A TOML value, or a command-line string if `cli`, as the field type `tp`; ValueError if it does not fit.

    Union members are tried in order, so `bool | str` reads "true" as True and anything else as a path.
    """
    options = _options(tp)
    if isinstance(value, str) and type(None) in options and value.strip().lower() in ("none", "null"):
        return None
    for option in options:
        if option is type(None):
            continue
        if get_origin(option) is list:  # list[str] or list[float]: a TOML array; as flags also words or commas
            items = value
            if cli:
                with contextlib.suppress(tomllib.TOMLDecodeError):  # no array: the error below names the value
                    items = _cli_list(value)
            if isinstance(items, list):
                with contextlib.suppress(ValueError):  # an item of the wrong type: try the union's next member
                    return [_convert(v, get_args(option)[0], cli) for v in items]
            continue
        if isinstance(value, str) and option is not str and (cli or option is dict):
            try:
                return _from_text(value, option)
            except ValueError:
                continue
        if isinstance(value, option) and (option is bool or not isinstance(value, bool)):
            return value
        if option is float and type(value) is int:
            return float(value)
    raise ValueError(f"expected {_type_name(tp)}, got {value!r}")


def _cli_list(value: str | list[str]) -> list:
    """A list flag's items: one TOML array (`'["q_proj", "v_proj"]'`), or its words (`--key a b`, TRL's nargs), each
    split at commas (`--key a,b`)."""
    words = [value] if isinstance(value, str) else value
    if len(words) == 1 and words[0].lstrip().startswith("["):
        return tomllib.loads(f"value = {words[0]}")["value"]
    return [item.strip() for word in words for item in word.split(",") if item.strip()]


def _from_text(text: str, option: type):
    text = text.strip()
    if option is bool:
        if text.lower() not in _BOOLS:
            raise ValueError(text)
        return _BOOLS[text.lower()]
    if option is dict:  # a JSON object, as transformers parses its dict fields
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(text)
        return value
    return option(text)  # int("1.5") and float("x") raise ValueError


# ---------------------------------------------------------------------------------------------------------------------
# Help and saving


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field, read with ast from the sources of `cls` and its bases (a subclass wins)."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def config_help(cls: type) -> str:
    """`--help`: every field with its type, default and docstring; runtime fields; TRL keys accepted as no-ops."""
    docs, hints, fields = field_docs(cls), get_type_hints(cls), dataclasses.fields(cls)
    lines = [f"usage: python -m {module_name(cls)} [config.toml] [--key value | --key=value ...]", "",
             f"{cls.__name__}: {cls.__doc__.strip().splitlines()[0]}", "",
             'Keys may be set in the TOML file or as flags (flags win). "none" sets an optional key to None.',
             "A list key takes words, commas or a TOML array: --lora_target_modules q_proj v_proj.", ""]
    for f in (f for f in fields if f.init):
        lines += [f"  --{f.name} {_type_name(hints[f.name])} (default: {_show(f.default)})", f"      {docs[f.name]}"]
        if f.name in cls.unused:
            lines.append(f"      not used: {cls.unused[f.name]} (an error unless left at the default)")
    runtime = [f for f in fields if not f.init]
    if runtime:
        lines += ["", "Filled at runtime (cannot be set):"]
        lines += [f"  {f.name}: {docs[f.name]}" for f in runtime]
    if cls.trl_defaults_only:
        lines += ["", "TRL keys not implemented, accepted only at TRL's default (where they do nothing):"]
        lines += [f"  {key} = {_show(value)}" for key, value in cls.trl_defaults_only.items()]
    return "\n".join(lines)


def config_to_toml(cfg, given=None) -> str:
    """The resolved config as TOML that parse_config reads back (None as "none"; runtime fields as comments).
    `given`: the same config as parsed, before the run filled anything in: a field changed since (PPO's
    total_episodes) is written as given and its runtime value as a comment, so that the file is the run as started."""
    def toml(value) -> str:
        return '"none"' if value is None else _toml_value(value)

    lines = [f'# {module_name(type(cfg))}.{type(cfg).__name__} as resolved; "none" stands for None (TOML has no null)']
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        text = toml(value)
        if f.init and given is not None and getattr(given, f.name) != value:
            lines.append(f"{f.name} = {toml(getattr(given, f.name))}")
            lines.append(f"# {f.name} = {text}  (filled at runtime)")
        elif f.init:
            lines.append(f"{f.name} = {text}")
        elif value is not None:
            lines.append(f"# {f.name} = {text}  (filled at runtime)")
    return "\n".join(lines) + "\n"


def save_config(cfg, path: str | Path, given=None) -> None:
    """Write config_to_toml(cfg, given) to `path` (minGPT writes the resolved config next to its outputs)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_to_toml(cfg, given))


def changed_keys(saved: str, config: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """The keys set differently in two config_to_toml texts (comments aside), sorted; the keys in `ignore` aside."""
    def values(text: str) -> dict[str, str]:  # one "key = value" a line: config_to_toml writes no multi-line value
        return dict(line.split(" = ", 1) for line in text.splitlines() if " = " in line and not line.startswith("#"))

    before, now = values(saved), values(config)
    return sorted(key for key in before.keys() | now.keys() if key not in ignore and before.get(key) != now.get(key))


def _show(value) -> str:
    """A value as the user writes it (TOML, or none)."""
    return "none" if value is None else _toml_value(value)


def _toml_value(value) -> str:
    """TOML for a scalar, list or (inline) dict; TOML has no null, so None is the caller's business."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # Python's repr (1e-05, inf, nan) is valid TOML
    if isinstance(value, str):  # JSON's escapes are TOML's; DEL is the one control character JSON leaves raw
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else _toml_value(k)} = {_toml_value(v)}"
                 for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
