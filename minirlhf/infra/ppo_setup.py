"""What minirlhf.ppo loads before its loop, as TRL's examples/scripts/ppo/ppo.py builds it: the policy tokenizer, the
prompts, the policy and its frozen reference, the value model (estimator "gae" only) and the reward model (unless
reward functions alone score), and whether the reward model reads the policy's token ids or the texts.

The reward model reads the policy's ids as they are (TRL's PPO) unless its own tokenizer differs from the policy's
(vocabulary or special tokens; huggingface/trl#1674, #1979, #3595) or the prompts are conversations: then each
rollout is decoded and rendered again for it (infra.completions.reward_model_scores). The value model reads policy
ids, so it must share the policy's vocabulary: by default it starts from the reward model, or from the policy when
there is no reward model or the tokenizers differ. With padding_free (the default) every model is loaded as its
padding-free twin (infra/packing.py): the same outputs, no pads computed.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from minirlhf.data import is_conversational, prepare_prompt_dataset
from minirlhf.infra.config import import_function, require
from minirlhf.infra.files import MissingSplit, load_rows
from minirlhf.infra.hf import load_pretrained
from minirlhf.infra.lora import add_lora
from minirlhf.infra.packing import PaddingFreeCausalLM, PaddingFreeRewardModel
from minirlhf.infra.parallel import print0
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.model import CausalLM, RewardModel, disable_dropout


@dataclass
class PPOSetup:
    """What PPO trains on and with. reward_tokenizer: the reward model's own, when it reads the decoded texts (None:
    it reads the policy's ids); conversations: a conversational prompt's ids -> its messages; the functions by name."""

    tokenizer: Tokenizer
    train_dataset: list[dict]
    eval_dataset: list[dict]
    policy: CausalLM
    ref_policy: CausalLM | None  # None with LoRA: the policy with its adapters off
    value_model: RewardModel | None  # "gae" only
    reward_model: RewardModel | None  # None: reward functions alone score
    reward_tokenizer: Tokenizer | None
    conversations: dict[tuple, list]
    reward_funcs: dict[str, Callable]
    reward_weights: dict[str, float]
    metric_funcs: dict[str, Callable]


def load(args, run) -> PPOSetup:
    require(args.dataset_name is not None, "dataset_name", "is required (a prompt file or folder, or a Hub id)")
    # model_revision pins model_name_or_path alone (TRL's ModelConfig): sft_model_path's tokenizer matches its weights
    revision = args.model_revision if args.model_name_or_path else None
    tokenizer = Tokenizer.from_pretrained(args.model_name_or_path or args.sft_model_path, revision=revision)
    reward_tokenizer = reward_tokenizer_if_different(args, tokenizer)  # before the policy's [PAD] is added
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # TRL's example always adds "[PAD]" without resizing the embeddings (pads read id 0 in every forward);
        # we add it only when needed: a pad equal to EOS would mask every EOS out of the losses.
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.padding_side = "left"
    require(args.stop_token != "eos" or tokenizer.eos_token is not None, "stop_token", "the tokenizer has no EOS")

    conversations = {}  # a conversational prompt's ids -> its messages, for reward functions and the reward model

    def prompts(split: str, evaluation: bool = False) -> list[dict]:
        rows = load_rows(args.dataset_name, split, evaluation=evaluation)
        dataset = prepare_prompt_dataset(rows, tokenizer, f"{args.dataset_name} [{split}]")
        if rows and is_conversational(rows[0]):
            conversations.update({tuple(ex["input_ids"]): row["prompt"] for ex, row in zip(dataset, rows, strict=True)})
        return dataset

    train_dataset = prompts(args.dataset_train_split)
    # eval prompts only feed the sample completions (text to read, no metric): without a test split (a single data
    # file, or a folder without one) the training prompts serve, and it says so
    eval_dataset = []
    if args.num_sample_generations > 0:
        try:
            eval_dataset = prompts(args.dataset_test_split, evaluation=True)
        except MissingSplit:
            print0(f"[minirlhf] {args.dataset_name} has no {args.dataset_test_split!r} split: sample completions use "
                   "the training prompts")
            eval_dataset = train_dataset
    args.set_runtime_sizes(run.dist.world_size, len(train_dataset), run.dist.rank)
    if len(train_dataset) < args.batch_size // args.num_generations:
        raise ValueError(f"{args.dataset_name}: {len(train_dataset)} prompts, fewer than one batch of "
                         f"{args.batch_size // args.num_generations} (per_device_train_batch_size * "
                         "gradient_accumulation_steps * ranks / num_generations)")
    if args.reward_model_path is not None and (conversations or reward_tokenizer is not None):
        reward_tokenizer = reward_tokenizer or tokenizer
        print0("[minirlhf] the reward model reads the decoded texts, rendered again with its tokenizer")
        require(not conversations or reward_tokenizer.chat_template is not None, "reward_model_path",
                "the prompts are conversations, but the reward model's tokenizer has no chat template")

    # value and reward model from the reward model, policy and reference from the SFT model; critic-free
    # estimators build no value model, reward functions alone no reward model
    load_kwargs = dict(dtype=args.dtype, device=run.dist.device)
    causal_lm, reward_model_class = (PaddingFreeCausalLM, PaddingFreeRewardModel) if args.padding_free else (
        CausalLM, RewardModel)
    value_model, reward_model = None, None
    if args.advantage_estimator == "gae":
        same_ids = reward_tokenizer is None or reward_tokenizer is tokenizer
        value_path = args.value_model_path or (args.reward_model_path if same_ids else None) or args.sft_model_path
        print0(f"[minirlhf] value model from {value_path}")
        value_model = load_pretrained(reward_model_class, value_path, **load_kwargs)
    if args.reward_model_path is not None:
        reward_model = load_pretrained(reward_model_class, args.reward_model_path, **load_kwargs).eval().requires_grad_(
            False)
    policy = load_pretrained(causal_lm, args.sft_model_path, **load_kwargs)
    check_positions(policy, max(len(x["input_ids"]) for x in train_dataset + eval_dataset), args.response_length)
    ref_policy = None  # LoRA: the reference is the policy with its adapters off (huggingface/trl#1444)
    if args.use_peft:
        add_lora(policy, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    else:
        ref_policy = load_pretrained(causal_lm, args.sft_model_path, **load_kwargs).eval().requires_grad_(False)
    # the reward model first: by default the value model starts from it, so its vocabulary is the cause
    checks = [("reward_model_path", reward_model)] * (reward_tokenizer is None) + [("value_model_path", value_model)]
    for key, m in checks:
        if m is not None and m.cfg.vocab_size != policy.cfg.vocab_size:  # policy ids go in (huggingface/trl#1674)
            raise ValueError(f"{key}: vocabulary of {m.cfg.vocab_size} tokens, but sft_model_path has "
                             f"{policy.cfg.vocab_size}; it reads the policy's token ids, so it needs its vocabulary")
    for m in (policy, ref_policy, value_model, reward_model):
        if m is not None:
            disable_dropout(m)
    for m in (policy, value_model):
        if m is not None:
            m.transformer.gradient_checkpointing = args.gradient_checkpointing  # TRL never applies it
    metric_funcs = {spec.rpartition(":")[2]: import_function(spec, "metric_funcs") for spec in args.metric_funcs or []}
    reward_funcs = {spec.rpartition(":")[2]: import_function(spec, "reward_funcs") for spec in args.reward_funcs or []}
    reward_weights = dict(zip(reward_funcs, args.reward_weights or [1.0] * len(reward_funcs), strict=True))
    return PPOSetup(tokenizer, train_dataset, eval_dataset, policy, ref_policy, value_model, reward_model,
                    reward_tokenizer, conversations, reward_funcs, reward_weights, metric_funcs)


def reward_tokenizer_if_different(args, tokenizer: Tokenizer) -> Tokenizer | None:
    """The reward model's own tokenizer where it has one that differs from the policy's in its vocabulary or its
    special tokens; None otherwise (it then reads the policy's ids)."""
    if args.reward_model_path is None:
        return None
    try:
        theirs = Tokenizer.from_pretrained(args.reward_model_path)
    except ValueError:  # no tokenizer.json beside the reward model: it was trained on the policy's
        return None
    same = theirs.get_vocab() == tokenizer.get_vocab() and theirs.special_tokens == tokenizer.special_tokens
    return None if same else theirs


def check_positions(model: nn.Module, prompt_length: int, response_length: int) -> None:
    """The longest prompt plus response_length new tokens must fit a model with learned positions (GPT-2's n_positions:
    beyond it there is no embedding; rotary models extrapolate, as in transformers)."""
    limit = model.cfg.max_position_embeddings
    require(model.cfg.positions != "learned" or prompt_length + response_length <= limit, "response_length",
            f"the longest prompt ({prompt_length} tokens) + response_length ({response_length}) exceeds the model's "
            f"{limit} positions; lower response_length or shorten the prompts")
