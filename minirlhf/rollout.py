"""Rollouts for online RL: sample responses, score them (reference logprobs, values, reward model, functions of the
texts), and the near-greedy completions a run logs as it trains: the no-grad phase of TRL's `PPOTrainer.train` and its
`generate_completions` (trl/experimental/ppo/ppo_trainer.py). Text functions take TRL's reward-function arguments,
`f(prompts=[...], completions=[...]) -> [float, ...]`, named in a config as "package.module:function".
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from minirlhf.common import autocast, print0
from minirlhf.data import collate_prompts
from minirlhf.generate import generate
from minirlhf.losses import INVALID_LOGPROB, first_true_indices, logprobs_from_logits, truncate_response
from minirlhf.model import CausalLM, RewardModel, gather_index, get_reward, model_inputs
from minirlhf.packing import rollout_packing
from minirlhf.parallel import gathered_weights
from minirlhf.tokenizer import Tokenizer


@torch.no_grad()
def sample_responses(policy: CausalLM, queries: torch.Tensor, args, pad_token_id: int, stop_token_id: int | None,
                     precision: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to response_length tokens for (B, context_length) left-padded queries in chunks of
    local_rollout_forward_batch_size. Returns query_responses (B, context_length + T) and the behaviour logprobs
    (B, T), gathered while sampling (TRL keeps the (B, T, vocab) scores and takes them afterwards)."""
    query_responses, logprobs = [], []
    with gathered_weights(policy, args.fsdp):  # FSDP: the whole policy on every rank, once for all chunks
        for i in range(0, len(queries), args.local_rollout_forward_batch_size):
            with autocast(queries.device, precision):
                out = generate(policy, queries[i : i + args.local_rollout_forward_batch_size], pad_token_id,
                               args.response_length, temperature=args.temperature + 1e-7, top_k=0, top_p=1.0,
                               stop_token_id=stop_token_id)
            query_responses.append(out.query_responses)
            logprobs.append(out.logprobs)
    # a chunk whose rows all stopped early is shorter: right-pad it (TRL's batch_generation)
    width = max(qr.shape[1] for qr in query_responses)
    query_responses = [F.pad(qr, (0, width - qr.shape[1]), value=pad_token_id) for qr in query_responses]
    logprobs = [F.pad(lp, (0, width - queries.shape[1] - lp.shape[1]), value=INVALID_LOGPROB) for lp in logprobs]
    return torch.cat(query_responses), torch.cat(logprobs)


@torch.no_grad()
def score_responses(ref_policy: CausalLM, value_model: RewardModel | None, reward_model: RewardModel | None,
                    queries: torch.Tensor,
                    query_responses: torch.Tensor, logprobs: torch.Tensor, args, pad_token_id: int,
                    stop_token_id: int | None, precision: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Reference logprobs, values and scores of sampled responses, in chunks of local_rollout_forward_batch_size
    (TRL's `PPOTrainer.train`, the no-grad loop after generation). Returns the rollouts, raw: logprobs and values
    are still garbage after each response's end and scores carry no EOS penalty yet; every tensor is (B, T) but
    sequence_lengths and raw_scores (B,). Without a value model there are no raw_values; without a reward model the
    raw_scores are 0 (reward functions add theirs)."""
    context_length = queries.shape[1]
    device = queries.device

    def packing(rows, model):  # padding-free: by model, as its sliding window decides how pads pack
        return rollout_packing(rows, pad_token_id, context_length, model) if args.padding_free else None

    out = {key: [] for key in ("raw_ref_logprobs", "postprocessed_responses", "sequence_lengths",
                               *(["raw_values"] if value_model is not None else []), "raw_scores")}
    for i in range(0, len(queries), args.local_rollout_forward_batch_size):
        query = queries[i : i + args.local_rollout_forward_batch_size]
        query_response = query_responses[i : i + args.local_rollout_forward_batch_size]
        response = query_response[:, context_length:]  # (b, T)
        with autocast(device, precision):
            # logits from the last query token to the one before the last response token: (b, T, vocab)
            ref_logits = ref_policy(*model_inputs(query_response, pad_token_id), logits_to_keep=response.shape[1] + 1,
                                    packing=packing(query_response, ref_policy))[:, :-1]
        ref_logits = ref_logits.float() / (args.temperature + 1e-7)  # (b, T, vocab): one chunk at a time
        out["raw_ref_logprobs"].append(logprobs_from_logits(ref_logits, gather_index(response, pad_token_id)))
        del ref_logits

        # Response Processing 1. truncate response after the first occurrence of `stop_token_id`
        postprocessed_response = response
        if stop_token_id is not None:
            postprocessed_response = truncate_response(stop_token_id, pad_token_id, response)

        # Response Processing 2. run reward model on the truncated responses; values on the raw ones
        postprocessed_query_response = torch.cat((query, postprocessed_response), 1)
        sequence_length = first_true_indices(postprocessed_response == pad_token_id) - 1  # L: last real token
        with autocast(device, precision):
            if value_model is not None:
                full_value, _, _ = get_reward(value_model, query_response, pad_token_id, context_length,
                                              packing(query_response, value_model))
                out["raw_values"].append(full_value[:, context_length - 1 : -1].squeeze(-1).float())  # V before each
            score = torch.zeros(len(query), device=device)
            if reward_model is not None:
                _, score, _ = get_reward(reward_model, postprocessed_query_response, pad_token_id, context_length,
                                         packing(postprocessed_query_response, reward_model))
        out["postprocessed_responses"].append(postprocessed_response)
        out["sequence_lengths"].append(sequence_length)
        out["raw_scores"].append(score.float())
    return {"query_responses": query_responses, "responses": query_responses[:, context_length:],
            "raw_logprobs": logprobs,
            **{key: torch.cat(chunks) for key, chunks in out.items()}}


def weighted_sum(scores: dict[str, list[float]], weights: dict[str, float], device) -> torch.Tensor:
    """(B,) sum over the reward functions named in `weights` of weight * score (TRL GRPO's reward_weights)."""
    return sum(weight * torch.tensor(scores[name], device=device) for name, weight in weights.items())


class Stopwatch:
    """Seconds spent in each phase of an update, logged as time/<phase>, and sampled tokens per second."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        self.last = self.now()

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: wait for the phase to finish
        return time.perf_counter()

    def lap(self, phase: str) -> None:
        now = self.now()
        self.seconds[phase], self.last = now - self.last, now

    def metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """time/<phase>, and time/tokens_per_second: response tokens up to each stop (this rank) per second of the
        whole update."""
        tokens = (~batch["padding_mask"]).sum().item()
        return {**{f"time/{k}": v for k, v in self.seconds.items()},
                "time/tokens_per_second": tokens / sum(self.seconds.values())}


def texts(tokenizer: Tokenizer, queries: torch.Tensor, responses: torch.Tensor,
          conversations: dict[tuple, list] | None = None) -> tuple[list, list]:
    """(prompts, completions) of (B, ctx) left-padded query and (B, T) response ids as TRL's reward functions take
    them: texts decoded without special tokens; for conversational prompts (`conversations`: prompt ids -> messages)
    the prompt's messages and [{"role": "assistant", "content": completion text}]."""
    completions = tokenizer.batch_decode(responses.tolist(), skip_special_tokens=True)
    if not conversations:
        return tokenizer.batch_decode(queries.tolist(), skip_special_tokens=True), completions
    pad = tokenizer.pad_token_id
    prompts = [conversations[tuple(t for t in query if t != pad)] for query in queries.tolist()]
    return prompts, [[{"role": "assistant", "content": c}] for c in completions]


def text_scores(funcs: dict[str, Callable], tokenizer: Tokenizer, queries: torch.Tensor, responses: torch.Tensor,
                conversations: dict[tuple, list] | None = None) -> dict[str, list[float]]:
    """Each function's scores of (B, ctx) query and (B, T) response ids, as `texts` gives them (TRL's arguments)."""
    if not funcs:
        return {}  # no decoding every update for nothing
    prompts, completions = texts(tokenizer, queries, responses, conversations)
    return {name: [float(x) for x in func(prompts=prompts, completions=completions)] for name, func in funcs.items()}


@torch.no_grad()
def reward_model_scores(reward_model: RewardModel, reward_tokenizer: Tokenizer, tokenizer: Tokenizer,
                        queries: torch.Tensor, responses: torch.Tensor, conversations: dict[tuple, list],
                        precision: torch.dtype | None) -> torch.Tensor:
    """(B,) scores of the reward model on the texts rendered again with its own tokenizer: a conversation with the
    response as the assistant turn (its chat template), or the decoded prompt + response and the reward tokenizer's
    EOS if the response stopped, as TRL's RewardTrainer saw its training pairs. Scored at the last token."""
    prompts, completions = texts(tokenizer, queries, responses, conversations)
    if conversations:
        pairs = zip(prompts, completions, strict=True)
        rows = [reward_tokenizer.apply_chat_template(prompt + answer, tokenize=True) for prompt, answer in pairs]
    else:
        stopped = (responses == tokenizer.eos_token_id).any(1).tolist()
        full = tokenizer.batch_decode(torch.cat((queries, responses), 1).tolist(), skip_special_tokens=True)
        eos = reward_tokenizer.eos_token or ""
        rows = [reward_tokenizer.encode(text + eos * stop) for text, stop in zip(full, stopped, strict=True)]
    device = queries.device
    lengths = torch.tensor([len(r) for r in rows], device=device)
    input_ids = torch.tensor([r + [0] * (max(lengths) - len(r)) for r in rows], device=device)  # right-padded
    attention_mask = torch.arange(input_ids.shape[1], device=device) < lengths[:, None]  # (B, T)
    with autocast(device, precision):
        scores = reward_model.token_scores(input_ids, attention_mask, attention_mask.cumsum(1) - 1)  # (B, T, 1)
    return scores[torch.arange(len(rows), device=device), lengths - 1, 0].float()


@torch.no_grad()
def sample_completions(policy: CausalLM, reward_model: RewardModel | None, tokenizer: Tokenizer,
                       eval_dataset: list[dict], args, stop_token_id: int | None, precision: torch.dtype | None,
                       metric_funcs: dict[str, Callable], reward_weights: dict[str, float] | None = None,
                       num_batches: int | None = None, reward_tokenizer: Tokenizer | None = None,
                       conversations: dict[tuple, list] | None = None) -> list[dict]:
    """TRL's generate_completions: near-greedy responses (temperature 0.01) to the first `num_batches` full eval
    batches (all if None), truncated at the stop token and scored as in training without the EOS penalty (reward
    model, plus the weighted functions of `reward_weights`), and by each function of `metric_funcs`. With a
    `reward_tokenizer` the reward model reads the texts (reward_model_scores)."""
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)  # own stream: the training RNG is left as it was
    batch_size, pad_token_id = args.per_device_eval_batch_size, tokenizer.pad_token_id
    rows = []
    with gathered_weights(policy, args.fsdp):  # FSDP: the whole policy for generating; the reward model stays sharded
        for start in range(0, len(eval_dataset) // batch_size * batch_size, batch_size)[:num_batches]:
            query = collate_prompts(eval_dataset[start : start + batch_size], pad_token_id)["input_ids"].to(device)
            context_length = query.shape[1]
            with autocast(device, precision):
                out = generate(policy, query, pad_token_id, args.response_length, temperature=0.01 + 1e-7, top_k=0,
                               top_p=1.0, stop_token_id=stop_token_id, generator=generator)
            postprocessed_response = out.query_responses[:, context_length:]
            if stop_token_id is not None:
                postprocessed_response = truncate_response(stop_token_id, pad_token_id, postprocessed_response)
            score = torch.zeros(len(query), device=device)
            if reward_tokenizer is not None:
                score = reward_model_scores(reward_model, reward_tokenizer, tokenizer, query, postprocessed_response,
                                            conversations, precision)
            elif reward_model is not None:
                with autocast(device, precision):
                    _, score, _ = get_reward(reward_model, torch.cat((query, postprocessed_response), 1),
                                             pad_token_id, context_length)
            queries = tokenizer.batch_decode(query.tolist(), skip_special_tokens=True)
            responses = tokenizer.batch_decode(postprocessed_response.tolist())  # special tokens kept, as TRL
            extra = text_scores(metric_funcs, tokenizer, query, postprocessed_response, conversations)
            if reward_weights:
                score = score + weighted_sum(extra, reward_weights, device)
            rows += [{"query": q, "response": r, "score": s, **{name: v[i] for name, v in extra.items()}}
                     for i, (q, r, s) in enumerate(zip(queries, responses, score.float().tolist(), strict=True))]
    return rows


def log_completions(rows: list[dict], step: int, output_dir: str) -> None:
    """Append rows to output_dir/completions.jsonl; print their mean scores and the first five (TRL prints those)."""
    if not rows:
        return
    with open(Path(output_dir) / "completions.jsonl", "a") as f:
        f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)
    scores = [key for key in rows[0] if key not in ("query", "response")]
    means = {key: round(sum(row[key] for row in rows) / len(rows), 4) for key in scores}
    print0(f"[minirlhf] update {step}: completions of {len(rows)} eval prompts, mean {means}")
    for row in rows[:5]:
        extra = "".join(f" {key} {row[key]:.2f}" for key in scores if key != "score")
        print0(f"  score {row['score']:+.3f}{extra} | {row['query']!r} -> {row['response']!r}")
