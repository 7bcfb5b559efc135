"""Rollouts for online RL: sample responses, then score them (reference logprobs, values, the reward model's
scores): the no-grad phase of TRL's `PPOTrainer.train` (trl/experimental/ppo/ppo_trainer.py) up to Response
Processing 2. The caller runs both under its autocast (and, under FSDP, with the policy's weights gathered).
Scores from functions of the texts (reward_funcs) and from a reward model with its own tokenizer are added by
minirlhf.infra.completions.
"""

import torch
import torch.nn.functional as F

from minirlhf.generate import generate
from minirlhf.losses import INVALID_LOGPROB, first_true_indices, gather_index, truncate_response
from minirlhf.model import CausalLM, RewardModel, get_reward, model_inputs


@torch.no_grad()
def sample_responses(policy: CausalLM, queries: torch.Tensor, args, pad_token_id: int,
                     stop_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to response_length tokens for (B, context_length) left-padded queries in chunks of
    local_rollout_forward_batch_size. Returns query_responses (B, context_length + T) and the behaviour logprobs
    (B, T), gathered while sampling (TRL keeps the (B, T, vocab) scores and takes them afterwards)."""
    query_responses, logprobs = [], []
    for i in range(0, len(queries), args.local_rollout_forward_batch_size):
        out = generate(policy, queries[i : i + args.local_rollout_forward_batch_size], pad_token_id,
                       args.response_length, temperature=args.temperature + 1e-7, stop_token_id=stop_token_id)
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
                    stop_token_id: int | None) -> dict[str, torch.Tensor]:
    """Reference logprobs, values and scores of sampled responses, in chunks of local_rollout_forward_batch_size
    (TRL's `PPOTrainer.train`, the no-grad loop after generation). Returns the rollouts, raw: logprobs and values
    are still garbage after each response's end and scores carry no EOS penalty yet; every tensor is (B, T) but
    sequence_lengths and raw_scores (B,). Without a value model there are no raw_values; without a reward model the
    raw_scores are 0 (reward functions add theirs)."""
    context_length = queries.shape[1]
    out = {key: [] for key in ("raw_ref_logprobs", "postprocessed_responses", "sequence_lengths",
                               *(["raw_values"] if value_model is not None else []), "raw_scores")}
    for i in range(0, len(queries), args.local_rollout_forward_batch_size):
        query = queries[i : i + args.local_rollout_forward_batch_size]
        query_response = query_responses[i : i + args.local_rollout_forward_batch_size]
        response = query_response[:, context_length:]  # (b, T)
        # log-probs of the response tokens at the temperature, each from the position before it (TRL: the logits
        # from the last query token to the one before the last response token, / temperature, log-softmax); no
        # (b, T, vocab) logits are made
        ref_logprob, _ = ref_policy(*model_inputs(query_response, pad_token_id),
                                    targets=gather_index(response, pad_token_id), temperature=args.temperature + 1e-7)
        out["raw_ref_logprobs"].append(ref_logprob)

        # Response Processing 1. truncate response after the first occurrence of `stop_token_id`
        postprocessed_response = response
        if stop_token_id is not None:
            postprocessed_response = truncate_response(stop_token_id, pad_token_id, response)

        # Response Processing 2. run reward model on the truncated responses; values on the raw ones
        postprocessed_query_response = torch.cat((query, postprocessed_response), 1)
        sequence_length = first_true_indices(postprocessed_response == pad_token_id) - 1  # L: last real token
        if value_model is not None:
            full_value, _, _ = get_reward(value_model, query_response, pad_token_id, context_length)
            out["raw_values"].append(full_value[:, :-1].squeeze(-1).float())  # (b, T): V before each response token
        score = torch.zeros(len(query), device=queries.device)
        if reward_model is not None:
            _, score, _ = get_reward(reward_model, postprocessed_query_response, pad_token_id, context_length)
        out["postprocessed_responses"].append(postprocessed_response)
        out["sequence_lengths"].append(sequence_length)
        out["raw_scores"].append(score.float())
    return {"query_responses": query_responses, "responses": query_responses[:, context_length:],
            "raw_logprobs": logprobs,
            **{key: torch.cat(chunks) for key, chunks in out.items()}}
