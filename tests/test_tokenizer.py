"""minirlhf.Tokenizer vs transformers' AutoTokenizer on tiny tokenizers trained on the fly with `tokenizers`.

Two styles: a byte-level BPE with ChatML special tokens (GPT-2 / Qwen style, no BOS), and a Metaspace BPE whose
post-processor prepends BOS (Llama style). The same files are loaded by both sides; ids, special tokens, decoding,
chat templates and save_pretrained round trips must agree exactly.
"""

import json
import sys

import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minirlhf.infra.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "Reward models score responses; PPO optimizes the policy.",
    "A tiny tokenizer for tests, with 123 numbers and ünïcödé.",
] * 4
TEXTS = ["Hello world!", "  leading spaces and the fox", "ünïcödé 42", "The policy<|endoftext|> ends here", "",
         "<s>[user] Hi</s><s>[assistant] the fox</s>"]

# A Qwen-style ChatML template (Qwen2's own, shortened): a default system turn, then <|im_start|>role ... <|im_end|>.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that uses tools (rendered with tojson) and a kwarg, and the special tokens transformers passes in.
TOOLS_TEMPLATE = (
    "{{ bos_token or '' }}{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}]{% if shout %}!{% endif %} {{ m['content'] }}"
    "{% if m.tool_calls is defined %} (calls {{ m.tool_calls | tojson }}){% endif %}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later",  # tojson must not escape <, >, &
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
MESSAGES = [
    {"role": "user", "content": "What color is the sky?"},
    {"role": "assistant", "content": "It is blue.", "tool_calls": None},  # None-valued keys are dropped
    {"role": "user", "content": "Why?"},
]


def train_byte_level() -> BackendTokenizer:
    """GPT-2 style: byte-level pre-tokenizer and decoder, <|endoftext|> = 0, ChatML markers as special tokens."""
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def train_llama(sentencepiece_style: bool = False) -> BackendTokenizer:
    """Llama style: Metaspace + byte fallback, <unk> <s> </s> = 0 1 2, a post-processor that prepends <s>.
    sentencepiece_style: Llama-2's converted tokenizer.json instead, a Prepend("▁") normalizer, no pre-tokenizer."""
    tok = BackendTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]  # add the 256 byte tokens <0x00>..<0xFF> byte fallback needs
    vocab = {**model["vocab"], **{f"<0x{b:02X}>": len(model["vocab"]) + b for b in range(256)}}
    tok.model = models.BPE(vocab, [tuple(merge) for merge in model["merges"]], unk_token="<unk>",
                           byte_fallback=True, fuse_unk=True)
    if sentencepiece_style:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def write_tokenizer(folder, style: str):
    """Write tokenizer files of one style into `folder` (as a checkpoint on the Hub would have them)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    if style == "byte_level":  # Qwen-like config: EOS = pad = <|endoftext|>, no BOS, template in the config
        backend = train_byte_level()
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                          "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                                          "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                                          "chat_template": CHATML_TEMPLATE, "model_max_length": 64}
    elif style == "llama":  # AddedToken dicts; add_eos_token is ignored by transformers 5 when tokenizer.json exists
        backend = train_llama()
        token = lambda content: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False, "special": True}
        files["tokenizer_config.json"] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("<s>"),
                                          "eos_token": token("</s>"), "unk_token": token("<unk>"),
                                          "add_bos_token": True, "add_eos_token": True, "padding_side": "left"}
        (folder / "chat_template.jinja").write_text(TOOLS_TEMPLATE)
    elif style == "llama2_class":  # LlamaTokenizer rebuilds the pipeline; its padding_side defaults to "left"
        backend = train_llama(sentencepiece_style=True)
        files["tokenizer_config.json"] = {"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "pad_token": None,
                                          "add_bos_token": True, "add_eos_token": False}
        files["config.json"] = {"model_type": "llama"}
    elif style == "gpt2_class":  # GPT-2 checkpoints name no special token: the GPT2Tokenizer class supplies them
        backend = train_byte_level()
        files["tokenizer_config.json"] = {"model_max_length": 1024}
        files["config.json"] = {"model_type": "gpt2"}
    elif style == "neox_class":  # Pythia: GPTNeoXTokenizer's default pad token <|padding|> is added to the vocab
        backend = train_byte_level()
        # special_tokens_map.json overrides the config (no added_tokens_decoder there); unk comes from the class
        files["tokenizer_config.json"] = {"tokenizer_class": "GPTNeoXTokenizer", "eos_token": "<|endoftext|>"}
        files["special_tokens_map.json"] = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}
        files["config.json"] = {"model_type": "gpt_neox"}
    else:
        raise ValueError(style)
    backend.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


STYLES = ["byte_level", "llama", "llama2_class", "gpt2_class", "neox_class"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {style: write_tokenizer(root / style, style) for style in STYLES}


def special_tokens(tokenizer) -> dict:
    names = ["bos_token", "eos_token", "unk_token", "pad_token"]
    return {name: (getattr(tokenizer, name), getattr(tokenizer, name + "_id")) for name in names}


def assert_same_tokenizer(ours: Tokenizer, theirs) -> None:
    assert special_tokens(ours) == special_tokens(theirs)
    assert (len(ours), ours.vocab_size) == (len(theirs), theirs.vocab_size)
    assert ours.padding_side == theirs.padding_side
    for add_special_tokens in (True, False):
        ours_ids = [ours.encode(text, add_special_tokens=add_special_tokens) for text in TEXTS]
        theirs_ids = [theirs.encode(text, add_special_tokens=add_special_tokens) for text in TEXTS]
        assert ours_ids == theirs_ids
    for skip_special_tokens in (True, False):
        ids = [theirs.encode(text) for text in TEXTS]
        assert ours.batch_decode(ids, skip_special_tokens) == theirs.batch_decode(ids, skip_special_tokens)
        theirs_text = theirs.decode(ids[3], skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids[3], skip_special_tokens) == theirs_text


@pytest.mark.parametrize("style", STYLES)
def test_matches_transformers(tokenizer_dirs, style):
    ours = Tokenizer.from_pretrained(tokenizer_dirs[style])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[style])
    assert_same_tokenizer(ours, theirs)
    tokens = ["<|endoftext|>", "<s>", "</s>", "not-a-token"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)


def test_bos_from_post_processor_not_config(tokenizer_dirs):
    # The llama files say add_eos_token=True, but transformers 5.23 follows tokenizer.json: BOS only.
    ours = Tokenizer.from_pretrained(tokenizer_dirs["llama"])
    ids = ours.encode("Hello world!")
    assert ids[0] == ours.bos_token_id and ids[-1] != ours.eos_token_id
    assert ours.encode("Hello world!", add_special_tokens=False) == ids[1:]


def test_special_tokens_can_be_set_and_added(tokenizer_dirs):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["llama"])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["llama"])
    with pytest.raises(ValueError, match=r"add_special_tokens\(\{'pad_token': '\[PAD\]'\}\)"):
        ours.pad_token = "[PAD]"
    ours.pad_token = "</s>"
    theirs.pad_token = "</s>"
    assert special_tokens(ours) == special_tokens(theirs)
    # TRL's PPO example: a new [PAD] special token, embeddings not resized
    assert ours.add_special_tokens({"pad_token": "[PAD]"}) == theirs.add_special_tokens({"pad_token": "[PAD]"}) == 1
    assert_same_tokenizer(ours, theirs)
    assert ours.encode("a [PAD] b") == theirs.encode("a [PAD] b")
    with pytest.raises(ValueError, match="unknown names"):
        ours.add_special_tokens({"padding_token": "[PAD]"})


@pytest.mark.parametrize("style", STYLES)
def test_save_pretrained_round_trip(tokenizer_dirs, tmp_path, style):
    ours = Tokenizer.from_pretrained(tokenizer_dirs[style])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs[style])
    for tokenizer in (ours, theirs):
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
        tokenizer.padding_side = "left"
    ours.save_pretrained(tmp_path)
    theirs_reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours_reloaded = Tokenizer.from_pretrained(tmp_path)
    assert_same_tokenizer(ours_reloaded, theirs)
    assert_same_tokenizer(ours, theirs_reloaded)
    assert theirs_reloaded.chat_template == theirs.chat_template == ours_reloaded.chat_template
    assert theirs_reloaded.model_max_length == theirs.model_max_length == ours_reloaded.model_max_length


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_template_matches_transformers(tokenizer_dirs, add_generation_prompt):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    kw = dict(add_generation_prompt=add_generation_prompt)
    for messages in (MESSAGES, [{"role": "system", "content": "Be brief."}, *MESSAGES[:1]]):
        ours_text = ours.apply_chat_template(messages, **kw)
        assert ours_text == theirs.apply_chat_template(messages, tokenize=False, **kw)
        assert ours_text.endswith("<|im_start|>assistant\n") == add_generation_prompt
        theirs_ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
        assert ours.apply_chat_template(messages, tokenize=True, **kw) == theirs_ids
        ours_dict = ours.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        assert ours_dict == dict(theirs.apply_chat_template(messages, tokenize=True, return_dict=True, **kw))


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_template_with_tools_kwargs_and_bos_matches_transformers(tokenizer_dirs, tools):
    # chat_template.jinja, tools through tojson (no HTML escaping, key order kept), bos/eos and a custom kwarg
    ours = Tokenizer.from_pretrained(tokenizer_dirs["llama"])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["llama"])
    for kw in (dict(), dict(add_generation_prompt=True, shout=True)):
        ours_text = ours.apply_chat_template(MESSAGES, tools=tools, **kw)
        assert ours_text == theirs.apply_chat_template(MESSAGES, tools=tools, tokenize=False, **kw)
        assert ours_text.startswith("<s>")
        # tokenizing does not add a second BOS: the template wrote it
        theirs_ids = theirs.apply_chat_template(MESSAGES, tools=tools, tokenize=True, return_dict=False, **kw)
        assert ours.apply_chat_template(MESSAGES, tools=tools, tokenize=True, **kw) == theirs_ids
        assert theirs_ids.count(ours.bos_token_id) == 1


def test_template_raise_exception_and_generation_tag(tokenizer_dirs):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}"
                "{% generation %}{{ m['content'] }}{% endgeneration %}|{% endfor %}")
    ours.chat_template = theirs.chat_template = template
    assert ours.apply_chat_template(MESSAGES) == theirs.apply_chat_template(MESSAGES, tokenize=False)
    with pytest.raises(Exception, match="no tools here"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_missing_jinja2_gives_install_hint(tokenizer_dirs, monkeypatch):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["byte_level"])
    ours.chat_template = "{{ messages[0]['content'] }} (a template no other test compiles)"
    monkeypatch.setitem(sys.modules, "jinja2", None)  # `import jinja2` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'minirlhf\[chat\]'"):
        ours.apply_chat_template(MESSAGES)


def test_clear_errors(tokenizer_dirs, tmp_path):
    ours = Tokenizer.from_pretrained(tokenizer_dirs["gpt2_class"])
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(MESSAGES)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_text("")
    with pytest.raises(ValueError, match=f"{tmp_path} has no tokenizer.json.*sentencepiece"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing: no such file or folder"):
        Tokenizer.from_pretrained(tmp_path / "missing")


def test_hub_id_read_from_offline_cache(tokenizer_dirs, tmp_path, monkeypatch):
    # The huggingface_hub cache layout: models--owner--name/{refs/main, snapshots/<commit>/<files>}
    from huggingface_hub import constants

    repo = tmp_path / "models--tiny--chatml"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tokenizer_dirs["byte_level"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ours = Tokenizer.from_pretrained("tiny/chatml")
    assert_same_tokenizer(ours, transformers.AutoTokenizer.from_pretrained(tokenizer_dirs["byte_level"]))
