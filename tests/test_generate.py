"""minirlhf.generate vs references: a no-cache loop and transformers' generate (through TRL's PPO helper).

Each model test saves a random transformers model with `save_pretrained` and loads it with our `load_pretrained`.
Prompts are left-padded with rows of different lengths. Greedy tokens (sampling at a temperature so low that every
other token has probability exactly 0) must be exactly equal; logits and logprobs
agree to fp32 tolerance on the positions up to and including each row's stop token (later ones are padding).
"""

import pytest
import torch
import transformers
from tiny import FAMILIES, VOCAB, hf_model
from trl.experimental.ppo.ppo_trainer import first_true_indices, forward, truncate_response
from trl.experimental.ppo.ppo_trainer import generate as trl_generate
from trl.trainer.utils import selective_log_softmax

from minirlhf import CausalLM
from minirlhf.generate import generate
from minirlhf.infra.hf import load_pretrained

TOL = dict(rtol=1e-5, atol=1e-5)
# The greedy test scales the random weights up 25x (so greedy decoding does not just repeat one token); activations
# grow with them, and logits of magnitude ~9 agree to 2e-5 rather than 1e-6.
GREEDY_TOL = dict(rtol=1e-5, atol=1e-4)
MAX_NEW_TOKENS = 16
GREEDY = 1e-10  # logits / GREEDY: the softmax is exactly one-hot at the largest logit, so sampling is argmax


def left_padded_queries(pad_id: int, lengths=(7, 4, 1), seed: int = 0) -> torch.Tensor:
    """(3, 7) random prompt ids (never 0 or pad_id), left-padded with pad_id to the longest row."""
    g = torch.Generator().manual_seed(seed)
    ctx = max(lengths)
    queries = torch.randint(3, VOCAB, (len(lengths), ctx), generator=g)
    is_pad = torch.arange(ctx)[None] < ctx - torch.tensor(lengths)[:, None]
    return queries.masked_fill(is_pad, pad_id)


def load_ours(theirs, tmp_path) -> CausalLM:
    theirs.save_pretrained(tmp_path / "theirs")
    return load_pretrained(CausalLM, str(tmp_path / "theirs")).eval()


def generate_recording_logits(model: CausalLM, queries, pad_id, *args, **kwargs):
    """generate(), and the model's fp32 logits (B, T, vocab) at the last position of each forward: each token was
    drawn from softmax(logits / temperature). A finished row's forwards stop (its logits stay 0 here): forward t
    computes the rows without a stop among the first t tokens."""
    recorded, forward = [], model.forward

    def recording_forward(*forward_args, **forward_kwargs):
        logits = forward(*forward_args, **forward_kwargs)
        recorded.append(logits[:, -1].float())
        return logits

    model.forward = recording_forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        out = generate(model, queries, pad_id, *args, **kwargs)
    finally:
        del model.forward
    responses = out.query_responses[:, queries.shape[1]:]
    stopped = (responses == kwargs.get("stop_token_id", -1)).cumsum(1) > 0  # (B, T): at or after the stop
    full = torch.zeros(len(queries), len(recorded), recorded[0].shape[-1])
    for t, logits in enumerate(recorded):  # one forward per generated token
        full[torch.ones(len(queries), dtype=torch.bool) if t == 0 else ~stopped[:, t - 1], t] = logits
    return out, full


def greedy_without_cache(model: CausalLM, queries: torch.Tensor, pad_id: int, steps: int) -> torch.Tensor:
    """The reference: re-run the full forward on everything so far (TRL's mask and positions) and take the argmax."""
    query_responses = queries
    for _ in range(steps):
        mask = (query_responses != pad_id).long()
        mask[:, queries.shape[1]:] = 1  # generated tokens are never padding here: no stop token in this loop
        logits = model(query_responses.masked_fill(mask == 0, 0), mask, mask.cumsum(-1) - mask)
        query_responses = torch.cat([query_responses, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return query_responses


def queries_and_stop_token(model: CausalLM, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Prompts whose greedy responses share a token, and that token as the stop id: every row stops, at different
    steps, before MAX_NEW_TOKENS. Tries prompt seeds in order, so the choice is deterministic."""
    for seed in range(50):
        queries = left_padded_queries(pad_id, seed=seed)
        reference = greedy_without_cache(model, queries, pad_id, MAX_NEW_TOKENS)
        responses = reference[:, queries.shape[1]:]
        for stop_id in responses[0].unique().tolist():
            stop_at = first_true_indices(responses == stop_id)  # (B,)
            if int(stop_at.max()) < MAX_NEW_TOKENS - 1 and len(set(stop_at.tolist())) > 1:
                return queries, reference, stop_id
    raise AssertionError("no prompt seed gives greedy responses that share a token")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_no_cache_and_transformers(family, tmp_path):
    pad_id = 0
    theirs_model = hf_model(family, initializer_range=0.5)  # not 0.02, so that greedy does not repeat one token
    ours_model = load_ours(theirs_model, tmp_path)
    queries, reference, stop_id = queries_and_stop_token(ours_model, pad_id)
    ctx = queries.shape[1]

    # Without a stop token: the cached loop must pick exactly the no-cache loop's tokens.
    ours = generate(ours_model, queries, pad_id, MAX_NEW_TOKENS, temperature=GREEDY)
    assert torch.equal(ours.query_responses, reference)

    # With a stop token that greedy decoding really produces: rows finish at different steps and all stop early.
    stop_at = first_true_indices(reference[:, ctx:] == stop_id)  # (B,)
    expected = truncate_response(stop_id, pad_id, reference[:, ctx:])[:, : int(stop_at.max()) + 1]
    ours, ours_logits = generate_recording_logits(ours_model, queries, pad_id, MAX_NEW_TOKENS, temperature=GREEDY,
                                                  stop_token_id=stop_id)
    assert torch.equal(ours.query_responses[:, ctx:], expected)

    theirs_config = transformers.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop_id,
                                                  pad_token_id=pad_id)
    theirs_query_responses, theirs_logits = trl_generate(theirs_model, queries, pad_id, theirs_config)
    assert torch.equal(ours.query_responses, theirs_query_responses)
    valid = torch.arange(expected.shape[1])[None] <= stop_at[:, None]  # up to and including the stop token
    torch.testing.assert_close(ours_logits[valid], theirs_logits[valid], **GREEDY_TOL)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "mistral"])
def test_cached_logits_match_full_forward(family, tmp_path):
    ours_model = load_ours(hf_model(family), tmp_path)
    pad_id = VOCAB  # outside the embedding: only works because pads are replaced by 0 before the forward
    queries = left_padded_queries(pad_id, seed=1)
    ctx = queries.shape[1]
    ours, ours_logits = generate_recording_logits(ours_model, queries, pad_id, MAX_NEW_TOKENS, temperature=1.0,
                                                  generator=torch.Generator().manual_seed(0))

    query_responses = ours.query_responses
    mask = (query_responses != pad_id).long()
    full_logits = ours_model(query_responses.masked_fill(mask == 0, 0), mask, mask.cumsum(-1) - mask)
    torch.testing.assert_close(ours_logits, full_logits[:, ctx - 1 : -1], **TOL)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2", "qwen3"])
def test_sampling_reproducible_and_logprobs_match_trl_forward(family, tmp_path):
    theirs_model = hf_model(family)
    ours_model = load_ours(theirs_model, tmp_path)
    pad_id, temperature = VOCAB, 0.7  # PPOConfig.temperature; TRL generates with temperature + 1e-7
    queries = left_padded_queries(pad_id, seed=2)
    ctx = queries.shape[1]

    def sample(stop_id=None):
        return generate(ours_model, queries, pad_id, MAX_NEW_TOKENS, temperature=temperature + 1e-7,
                        stop_token_id=stop_id, generator=torch.Generator().manual_seed(123))

    first, second = sample(), sample()
    assert torch.equal(first.query_responses, second.query_responses)
    assert torch.equal(first.logprobs, second.logprobs)

    # A stop token sampled by row 0 at step 3: the same draws up to each row's stop, padding after it.
    stop_id = int(first.query_responses[0, ctx + 3])
    ours = sample(stop_id)
    responses = ours.query_responses[:, ctx:]
    T = responses.shape[1]
    assert torch.equal(responses, truncate_response(stop_id, pad_id, first.query_responses[:, ctx:])[:, :T])
    assert (responses == pad_id).any(), "no row finished before the others: pick another stop step"

    # TRL's reference logprobs: a full transformers forward, logits[ctx-1:-1] / (temperature + 1e-7), gathered.
    theirs_logits = forward(theirs_model, ours.query_responses, pad_id).logits[:, ctx - 1 : -1]
    in_vocab_responses = responses.masked_fill(responses == pad_id, 0)  # pads (id VOCAB) sit after the stop
    theirs_logprobs = selective_log_softmax(theirs_logits / (temperature + 1e-7), in_vocab_responses)
    valid = torch.arange(T)[None] <= first_true_indices(responses == stop_id)[:, None]
    torch.testing.assert_close(ours.logprobs[valid], theirs_logprobs[valid], **TOL)
    # a finished row's forwards stop; the rows still running compute bitwise what they did beside it
    assert torch.equal(ours.logprobs[valid], first.logprobs[:, :T][valid])


def test_sampling_matches_transformers_draws(tmp_path):
    """With the same global seed, our multinomial draws and processed logits are transformers' (through TRL)."""
    theirs_model = hf_model("llama")
    ours_model = load_ours(theirs_model, tmp_path)
    pad_id, stop_id, temperature = 0, 2, 0.7 + 1e-7  # stop = the config's eos, which row 0 samples at step 8
    queries = left_padded_queries(pad_id, seed=3)
    ctx = queries.shape[1]
    theirs_config = transformers.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=True,
                                                  temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad_id,
                                                  eos_token_id=stop_id)
    torch.manual_seed(7)
    theirs_query_responses, theirs_logits = trl_generate(theirs_model, queries, pad_id, theirs_config)
    torch.manual_seed(7)
    ours, ours_logits = generate_recording_logits(ours_model, queries, pad_id, MAX_NEW_TOKENS, temperature=temperature,
                                                  stop_token_id=stop_id)
    ours_logits = ours_logits / temperature  # what the tokens were drawn from, as transformers' warped scores
    assert torch.equal(ours.query_responses, theirs_query_responses)
    responses = ours.query_responses[:, ctx:]
    stop_at = first_true_indices(responses == stop_id)  # (B,)
    assert int(stop_at[0]) < responses.shape[1] - 1, "row 0 should finish before the others"
    # After its stop a row is fed the pad id by transformers but its own sample by us: compare up to the stop.
    valid = torch.arange(responses.shape[1])[None] <= stop_at[:, None]
    torch.testing.assert_close(ours_logits[valid], theirs_logits[valid], **TOL)
    theirs_logprobs = selective_log_softmax(theirs_logits, theirs_query_responses[:, ctx:])
    torch.testing.assert_close(ours.logprobs[valid], theirs_logprobs[valid], **TOL)


def test_bad_arguments_raise(tmp_path):
    model = load_ours(hf_model("llama"), tmp_path)
    queries = left_padded_queries(0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, queries, 0, 4, temperature=0.0)
    with pytest.raises(ValueError, match="queries must be"):
        generate(model, queries[0], 0, 4)
