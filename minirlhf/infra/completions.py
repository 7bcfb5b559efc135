"""What PPO scores and logs besides the reward model's scores of the policy's ids: functions of the texts (TRL
GRPO/RLOO's reward functions, minirlhf's metric functions: `f(prompts=[...], completions=[...]) -> [float, ...]`, named
"package.module:function"), a reward model with its own tokenizer (the texts rendered again for it), the near-greedy
sample completions TRL's `generate_completions` logs, and the time each phase of an update takes.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minirlhf.data import collate_prompts
from minirlhf.generate import generate
from minirlhf.infra.parallel import gathered_weights, print0
from minirlhf.infra.run import autocast
from minirlhf.infra.tokenizer import Tokenizer
from minirlhf.losses import truncate_response
from minirlhf.model import RewardModel, get_reward


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


def add_text_scores(rollouts: dict[str, torch.Tensor], setup, queries: torch.Tensor,
                    precision: torch.dtype | None) -> dict[str, list[float]]:
    """After rollout.score_responses: a reward model with its own tokenizer scores the texts (the rollouts'
    raw_scores), reward functions add their weighted scores to them; returns every text function's scores (the metric
    functions' too), for the log. `setup`: ppo_setup.PPOSetup."""
    responses = rollouts["postprocessed_responses"]
    if setup.reward_tokenizer is not None:
        rollouts["raw_scores"] = reward_model_scores(setup.reward_model, setup.reward_tokenizer, setup.tokenizer,
                                                     queries, responses, setup.conversations, precision)
    scores = text_scores({**setup.metric_funcs, **setup.reward_funcs}, setup.tokenizer, queries, responses,
                         setup.conversations)
    if setup.reward_funcs:
        rollouts["raw_scores"] = rollouts["raw_scores"] + weighted_sum(scores, setup.reward_weights, queries.device)
    return scores


def log_sample_completions(setup, args, run, step: int, num_batches: int | None = None) -> None:
    """Near-greedy completions of the eval prompts, scored, appended to completions.jsonl: rank 0 alone, or under
    FSDP every rank (the sharded models need them all), which then compute the same ones."""
    if (run.dist.is_main or args.fsdp) and setup.eval_dataset:
        rows = sample_completions(setup, args, run.precision, num_batches)
        if run.dist.is_main:
            log_completions(rows, step, args.output_dir)


@torch.no_grad()
def sample_completions(setup, args, precision: torch.dtype | None, num_batches: int | None = None) -> list[dict]:
    """TRL's generate_completions: near-greedy responses (temperature 0.01) to the first `num_batches` full eval
    batches (all if None), truncated at the stop token and scored as in training without the EOS penalty (reward
    model, plus the weighted reward functions), and by each metric function."""
    policy, tokenizer, eval_dataset = setup.policy, setup.tokenizer, setup.eval_dataset
    stop_token_id = tokenizer.eos_token_id if args.stop_token == "eos" else args.stop_token_id
    device = next(policy.parameters()).device
    generator = torch.Generator(device).manual_seed(args.seed)  # own stream: the training RNG is left as it was
    batch_size, pad_token_id = args.per_device_eval_batch_size, tokenizer.pad_token_id
    rows = []
    with gathered_weights(policy, args.fsdp):  # FSDP: the whole policy for generating; the reward model stays sharded
        for start in range(0, len(eval_dataset) // batch_size * batch_size, batch_size)[:num_batches]:
            query = collate_prompts(eval_dataset[start : start + batch_size], pad_token_id)["input_ids"].to(device)
            context_length = query.shape[1]
            with autocast(device, precision):
                out = generate(policy, query, pad_token_id, args.response_length, temperature=0.01 + 1e-7,
                               stop_token_id=stop_token_id, generator=generator)
            response = out.query_responses[:, context_length:]
            if stop_token_id is not None:
                response = truncate_response(stop_token_id, pad_token_id, response)
            scored = {"postprocessed_responses": response, "raw_scores": torch.zeros(len(query), device=device)}
            if setup.reward_model is not None and setup.reward_tokenizer is None:
                with autocast(device, precision):
                    _, scored["raw_scores"], _ = get_reward(setup.reward_model, torch.cat((query, response), 1),
                                                            pad_token_id, context_length)
            extra = add_text_scores(scored, setup, query, precision)
            queries = tokenizer.batch_decode(query.tolist(), skip_special_tokens=True)
            responses = tokenizer.batch_decode(response.tolist())  # special tokens kept, as TRL
            scores = scored["raw_scores"].float().tolist()
            rows += [{"query": q, "response": r, "score": s, **{name: v[i] for name, v in extra.items()}}
                     for i, (q, r, s) in enumerate(zip(queries, responses, scores, strict=True))]
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
