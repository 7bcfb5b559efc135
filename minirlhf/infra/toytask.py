"""The shipped toy task (configs/toytask): its definition and its exact answer, so that reward modelling and PPO run
anywhere and can be checked against the truth.

Each prompt names a category ("name some fruits :"); a response is a list of words (" pear cat lemon"). The gold
score (`gold`; `gold_score` for a batch of texts, PPO's `metric_funcs`) is the fraction of the response's words that
belong to the prompt's category: it does not reward length, an empty response scores 0, and a policy raises it by
choosing better words. configs/toytask/make.py writes the task's files (preference pairs that only the prompt can
tell apart, SFT data, prompts, a tiny Llama config and a word-level tokenizer); it describes them.
"""

CATEGORIES = {
    "animals": "cat dog horse cow sheep goat pig lion".split(),
    "colors": "red blue green yellow purple pink brown black".split(),
    "fruits": "apple banana cherry grape lemon mango peach pear".split(),
    "tools": "hammer saw drill wrench chisel pliers shovel rake".split(),
    "vehicles": "car bus truck train bike boat plane tram".split(),
    "clothes": "shirt coat hat scarf sock glove dress skirt".split(),
    "instruments": "piano guitar violin drum flute trumpet harp cello".split(),
    "sports": "soccer tennis golf hockey rugby boxing rowing skiing".split(),
}
TEMPLATES = ["name some {} :", "list a few {} :", "give me {} :", "write about {} :", "tell me some {} :"]
SPECIAL_TOKENS = ["<|endoftext|>", "<pad>", "<unk>"]  # ids 0 (eos), 1 (pad), 2 (unk)


def gold(prompt: str, response: str) -> float:
    """Fraction of the response's words in the category the prompt names; anything after an EOS is ignored."""
    named = [w for w in prompt.split() if w in CATEGORIES]
    if len(named) != 1:
        raise ValueError(f"toytask prompt must name exactly one of {list(CATEGORIES)}: {prompt!r}")
    words = [w for w in response.split(SPECIAL_TOKENS[0])[0].split() if w != "<pad>"]
    return sum(w in CATEGORIES[named[0]] for w in words) / len(words) if words else 0.0


def gold_score(prompts: list, completions: list, **kwargs) -> list[float]:
    """`gold` of each row, as a text function with TRL's reward-function arguments: PPO logs it as
    objective/gold_score with `metric_funcs = ["minirlhf.infra.toytask:gold_score"]`, or trains on it as one of
    `reward_funcs`. Conversational rows (message lists) are scored on their last messages' contents."""
    def text(x) -> str:
        return x[-1]["content"] if isinstance(x, list) else x

    return [gold(text(p), text(c)) for p, c in zip(prompts, completions, strict=True)]
