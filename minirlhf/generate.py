"""Batched generation with a KV cache: left-padded prompts in, prompts + responses and behaviour logprobs out.

This replaces what TRL's PPO gets from transformers' `generate` (TRL's `batch_generation` and `forward`,
trl/experimental/utils.py and ppo_trainer.py):
- attention mask = `queries != pad_token_id`, pad ids replaced by 0 before the forward (so a pad id outside the
  embedding works), position ids `cumsum(mask) - mask` (first real token at 0), as TRL's `forward` uses;
- logits in fp32, divided by the temperature, then sampled (no top-k or top-p: TRL's PPO samples with neither);
- a row that has produced `stop_token_id` is finished: its later tokens are `pad_token_id`, its forwards stop (the
  other rows' tokens and logprobs are bitwise those of a batch that runs it on), and generation stops once every
  row is finished, so the response length T can be shorter than `max_new_tokens`.

Unlike TRL's `batch_generation`, which keeps the processed logits of every step, (B, T, vocab), and takes log-softmax
afterwards (its memory grows with the vocabulary, huggingface/trl#1833), the behaviour logprobs are gathered step
by step and only (B, T) is kept.
TRL passes `temperature + 1e-7` to generate; callers that want TRL's numbers should do the same.

Usage:
    out = generate(policy, queries, pad_token_id, max_new_tokens=53, temperature=0.7 + 1e-7, stop_token_id=eos)
    responses = out.query_responses[:, queries.shape[1]:]  # (B, T)
"""

from dataclasses import dataclass

import torch

from minirlhf.model import CausalLM, KVCache


@dataclass
class GenerationOutput:
    query_responses: torch.Tensor  # (B, context_length + T): the queries followed by the generated tokens
    logprobs: torch.Tensor  # (B, T): log-softmax of the processed logits at the sampled token, fp32


@torch.no_grad()
def generate(
    model: CausalLM,
    queries: torch.Tensor,
    pad_token_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    stop_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Sample up to max_new_tokens for each row of left-padded queries (a temperature near 0 is greedy decoding).

    Runs in the model's current mode (dropout stays as set). The prompt is prefilled once, then one token per step
    reads the cache. `generator` drives `torch.multinomial` (the global generator when None). Logprobs after a row's
    stop are those of the token sampled at the row's last logits, not of the pad written instead; PPO masks them.
    """
    if queries.dim() != 2:
        raise ValueError(f"generate: queries must be (batch, context_length), got shape {tuple(queries.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature > 0:
        raise ValueError(f"generate: temperature must be > 0, got {temperature}")
    B, context_length = queries.shape
    device = queries.device

    # Prompt: mask, positions and pad-free ids exactly as TRL's forward() builds them.
    query_mask = (queries != pad_token_id).long()  # (B, ctx)
    position_ids = query_mask.cumsum(-1) - query_mask  # (B, ctx)
    input_ids = queries.masked_fill(query_mask == 0, 0)
    # Keys seen so far: the prompt's mask, then 1 for every generated token (finished rows too, like transformers).
    attention_mask = torch.cat([query_mask, query_mask.new_ones(B, max_new_tokens)], dim=1)  # (B, ctx + max_new)
    next_position = query_mask.sum(-1, keepdim=True)  # (B, 1): each row continues after its own last prompt token
    cache = KVCache(model.cfg, B, context_length + max_new_tokens, device, next(model.parameters()).dtype)

    # Logits at the last prompt position only: projecting every prompt position onto the vocabulary would cost a
    # (B, ctx, vocab) matmul, ~40% of the prefill of a 50M model with a 32k vocabulary.
    logits = model(input_ids, attention_mask[:, :context_length], position_ids, cache, logits_to_keep=1)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # the rows still computed: the cache holds theirs alone
    # written in place: one small tensor kept per step would land in the big per-step temporaries' freed memory and
    # fragment the heap (at a 150k vocabulary the first 256 steps grew RSS by ~1 GB)
    responses = queries.new_full((B, max_new_tokens), pad_token_id)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    for step in range(max_new_tokens):
        # multinomial draws B x vocab exponentials (Gumbel-max) whatever the probabilities, so sampling every row,
        # finished ones from their last logits, keeps the generator's stream, and the others' tokens, as before
        scaled = logits.float() / temperature  # (B, vocab)
        next_token = torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)
        logprobs[:, step] = scaled.log_softmax(-1).gather(-1, next_token[:, None]).squeeze(-1)
        responses[:, step] = next_token.masked_fill(finished, pad_token_id)
        if stop_token_id is not None:
            finished |= next_token == stop_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        if finished[rows].any():  # a row has stopped: its keys and values leave the cache, its forwards stop
            running = ~finished[rows]
            rows = rows[running]
            cache.k, cache.v = [k[running] for k in cache.k], [v[running] for v in cache.v]
        out = model(next_token[rows, None], attention_mask[rows, : context_length + step + 1],
                    next_position[rows] + step, cache)[:, -1]
        logits = out if len(rows) == B else logits.index_copy(0, rows, out.to(logits.dtype))

    return GenerationOutput(
        query_responses=torch.cat([queries, responses[:, : step + 1]], dim=1),
        logprobs=logprobs[:, : step + 1],
    )
