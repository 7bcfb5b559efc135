"""A small tokenizer over a `tokenizers.Tokenizer` (tokenizer.json) that gives the ids transformers 5.23 gives.

It reads the files `save_pretrained` writes (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
chat_template.jinja) from a folder or a Hub id, and does what RLHF needs: encode/decode, the named special tokens,
chat templates (jinja2), and saving in a form `transformers.AutoTokenizer` loads back unchanged.

How transformers 5.23 decides the ids (read from tokenization_utils_base.py / tokenization_utils_tokenizers.py):
- Special tokens added to the text (Llama's BOS, ...) come from tokenizer.json's post-processor. When a tokenizer.json
  is present, `add_bos_token` / `add_eos_token` in tokenizer_config.json are dropped on load and do not rewrite it.
- Named special tokens come from tokenizer_config.json, overridden by special_tokens_map.json when the config has no
  `added_tokens_decoder`. Tokens the files leave out take the defaults of the transformers class that loads them
  (`_CLASS_DEFAULTS`: GPT-2 gets `<|endoftext|>` as EOS from its class, not its files). Every named special token
  is then registered as a special added token, so it is matched whole and skipped by `skip_special_tokens`.
- Model-specific classes rebuild the normalizer/pre-tokenizer around the vocabulary. For GPT-2, GPT-NeoX and Qwen2
  files this gives tokenizer.json's own pipeline; for sentencepiece-converted Llama files (Llama-2, TinyLlama) it
  does not, and we redo LlamaTokenizer's rebuild (no "▁" after special tokens, one "▁" before leading spaces).
- `apply_chat_template` renders in a sandboxed jinja2 environment and tokenizes with `add_special_tokens=False`.
Left out: slow (sentencepiece / vocab+merges only) tokenizers; classes of families minirlhf does not support.

Usage:
    tokenizer = Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
"""

import functools
import json
from datetime import datetime
from pathlib import Path

from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from minirlhf.infra.files import local_or_hub

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "config.json"]
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
VERY_LARGE_INTEGER = int(1e30)  # transformers' model_max_length when none is set

# Defaults of the transformers classes (their __init__ arguments and class attributes) for the families minirlhf
# supports, used where the files leave a value out. See `_transformers_class` for which class loads which files.
_ENDOFTEXT = "<|endoftext|>"
_CLASS_DEFAULTS = {
    "GPT2Tokenizer": {"bos_token": _ENDOFTEXT, "eos_token": _ENDOFTEXT, "unk_token": _ENDOFTEXT},
    "GPTNeoXTokenizer": {"bos_token": _ENDOFTEXT, "eos_token": _ENDOFTEXT, "unk_token": _ENDOFTEXT,
                         "pad_token": "<|padding|>"},
    "Qwen2Tokenizer": {"eos_token": _ENDOFTEXT, "unk_token": _ENDOFTEXT, "pad_token": _ENDOFTEXT},
    "LlamaTokenizer": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "padding_side": "left"},
}
_MODEL_TYPE_CLASSES = {"gpt2": "GPT2Tokenizer", "gpt_neox": "GPTNeoXTokenizer", "llama": "LlamaTokenizer",
                       "qwen2": "Qwen2Tokenizer", "qwen2_moe": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                       "qwen3_moe": "Qwen2Tokenizer"}


def _transformers_class(tokenizer_class: str | None, model_type: str | None, tokenizer_json: dict) -> str:
    """The class AutoTokenizer 5.23 loads the files with (models/auto/tokenization_auto.py), for the families above:
    tokenizer_config.json's `tokenizer_class`, else the one of config.json's `model_type`. Qwen2 checkpoints always
    get Qwen2Tokenizer; Mistral files and byte-level files that say LlamaTokenizer (Llama-3) get the generic class."""
    name = (tokenizer_class or "").removesuffix("Fast") or _MODEL_TYPE_CLASSES.get(model_type, "")
    byte_level = "ByteLevel" in json.dumps([tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("decoder")])
    if model_type == "qwen2":
        return "Qwen2Tokenizer"
    if name == "LlamaTokenizer" and (byte_level or model_type in ("mistral", "mixtral")):
        return "TokenizersBackend"
    return name


def _token_content(value: str | dict | None) -> str | None:
    """A special token from a config file: a string or an AddedToken-style dict {"content": ...}."""
    return value["content"] if isinstance(value, dict) else value


def _special_token_property(name: str) -> property:
    def get(self: "Tokenizer") -> str | None:
        return self.special_tokens[name]

    def set_(self: "Tokenizer", value: str | None) -> None:
        if value is not None and self._backend.token_to_id(value) is None:
            raise ValueError(f"{name} {value!r} is not in the vocabulary; add it with "
                             f"add_special_tokens({{{name!r}: {value!r}}})")
        self.special_tokens[name] = value

    return property(get, set_)


def _special_token_id_property(name: str) -> property:
    return property(lambda self: self.convert_tokens_to_ids(self.special_tokens[name]))


class Tokenizer:
    bos_token = _special_token_property("bos_token")
    eos_token = _special_token_property("eos_token")
    unk_token = _special_token_property("unk_token")
    pad_token = _special_token_property("pad_token")
    bos_token_id = _special_token_id_property("bos_token")
    eos_token_id = _special_token_id_property("eos_token")
    unk_token_id = _special_token_id_property("unk_token")
    pad_token_id = _special_token_id_property("pad_token")

    def __init__(self, backend: BackendTokenizer, config: dict, special_tokens: dict[str, str | None],
                 chat_template: str | None):
        self._backend = backend
        self._config = config  # tokenizer_config.json as read, written back by save_pretrained
        self.special_tokens = special_tokens  # {"bos_token": "<s>", ...}; None where unset
        self.chat_template = chat_template
        self.padding_side: str = config.get("padding_side", "right")
        self.model_max_length: int = config.get("model_max_length") or VERY_LARGE_INTEGER
        self._backend.no_truncation()  # transformers encodes without the truncation/padding tokenizer.json may carry
        self._backend.no_padding()
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = [_token_content(token) for token in (extra.values() if isinstance(extra, dict) else extra)]
        self._register_special_tokens([token for token in special_tokens.values() if token is not None] + extra)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None) -> "Tokenizer":
        """Load from a folder, or from a Hub id through the huggingface_hub cache (honours HF_HUB_OFFLINE)."""
        folder = local_or_hub(str(name_or_path), TOKENIZER_FILES, revision)
        if not folder.is_dir():
            raise ValueError(f"tokenizer: {name_or_path} is not a folder")
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"{folder} has no tokenizer.json: minirlhf reads only `tokenizers` (fast) tokenizers, not "
                             "slow/sentencepiece-only ones; convert it once with transformers' AutoTokenizer and "
                             "save_pretrained")

        def read_json(name: str) -> dict:
            return json.loads((folder / name).read_text(encoding="utf-8")) if (folder / name).is_file() else {}

        config = read_json("tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # transformers only reads the legacy map in this case
            config.update(read_json("special_tokens_map.json"))
        tokenizer_text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        tokenizer_json = json.loads(tokenizer_text)
        class_name = _transformers_class(config.get("tokenizer_class"), read_json("config.json").get("model_type"),
                                         tokenizer_json)
        config = {**_CLASS_DEFAULTS.get(class_name, {}), **config}
        special_tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}

        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # several named templates: minirlhf keeps the default one
            chat_template = next((t["template"] for t in chat_template if t["name"] == "default"), None)
        if (folder / "chat_template.jinja").is_file():  # transformers 5 writes it here; it wins over the config
            chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        backend = BackendTokenizer.from_str(tokenizer_text)
        if class_name == "LlamaTokenizer":  # its rebuild (models/llama/tokenization_llama.py, _get_prepend_scheme)
            add_prefix_space = config.get("add_prefix_space") is not False  # None means True
            prepend_scheme = ("always" if config.get("legacy") else "first") if add_prefix_space else "never"
            backend.normalizer = None
            backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=prepend_scheme, split=False)
            backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                                + [decoders.Strip(" ", 1, 0)] * add_prefix_space)
        return cls(backend, config, special_tokens, chat_template)

    # ---- vocabulary and special tokens

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """token -> id, added tokens included (transformers' get_vocab)."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str] | None) -> int | list[int] | None:
        """Unknown tokens map to unk_token_id (None when there is no unk token), as in transformers."""
        if tokens is None:
            return None
        if isinstance(tokens, list):
            return [self.convert_tokens_to_ids(token) for token in tokens]
        token_id = self._backend.token_to_id(tokens)
        return token_id if token_id is not None or self.unk_token is None else self._backend.token_to_id(self.unk_token)

    def add_special_tokens(self, special_tokens: dict[str, str]) -> int:
        """Set named special tokens, adding new ones to the vocabulary; returns how many were new. Resizing the
        model's embeddings is the caller's business (TRL's PPO example adds "[PAD]" without resizing)."""
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"add_special_tokens: unknown names {sorted(unknown)}; expected {SPECIAL_TOKEN_NAMES}")
        n_before = len(self)
        self._register_special_tokens(list(special_tokens.values()))
        self.special_tokens.update(special_tokens)
        return len(self) - n_before

    def _register_special_tokens(self, tokens: list[str]) -> None:
        """Mark `tokens` special in the backend (matched whole, skipped by skip_special_tokens), adding the new ones.
        Re-adding replaces a token's flags, so keep the lstrip/rstrip/... that tokenizer.json gives it."""
        existing = {token.content: token for token in self._backend.get_added_tokens_decoder().values()}
        flags = ("lstrip", "rstrip", "single_word", "normalized")
        self._backend.add_special_tokens([
            AddedToken(token, special=True, **{flag: getattr(existing[token], flag) for flag in flags})
            if token in existing else AddedToken(token, special=True, normalized=False) for token in tokens])

    # ---- encoding and decoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        # transformers skips clean_up_tokenization_spaces for BPE models, which all supported families use
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self._backend.decode_batch(sequences, skip_special_tokens=skip_special_tokens)

    # ---- chat templates

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, return_dict: bool = False,
                            **kwargs) -> str | list[int] | dict[str, list[int]]:
        """Render `messages` with the chat template (utils/chat_template_utils.py in transformers 5.23); extra
        kwargs reach the template. Tokenizing does not add special tokens: the template writes them."""
        if self.chat_template is None:
            raise ValueError("tokenizer has no chat template (no chat_template.jinja and no chat_template in "
                             "tokenizer_config.json); set tokenizer.chat_template")
        # transformers drops None-valued keys (e.g. content=None beside tool_calls) before rendering
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        special = {name: token for name, token in self.special_tokens.items() if token is not None}
        text = _compile_chat_template(self.chat_template).render(messages=messages, tools=tools, documents=None,
                                                       add_generation_prompt=add_generation_prompt,
                                                       **{**special, **kwargs})
        if not tokenize:
            return text
        input_ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids)} if return_dict else input_ids

    # ---- saving

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and chat_template.jinja, where
        transformers 5 puts a single template), loadable by this class and by transformers' AutoTokenizer."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        # like transformers: the post-processor in tokenizer.json is authoritative, added tokens live there too
        drop = ("add_bos_token", "add_eos_token", "added_tokens_decoder", "chat_template", "tokenizer_file")
        config = {key: value for key, value in self._config.items() if key not in drop}
        config.update(self.special_tokens)  # all seven, None included, so class defaults cannot creep back in
        config.update(padding_side=self.padding_side, model_max_length=self.model_max_length)
        if self.chat_template is not None:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")
        special_tokens_map = {name: token for name, token in self.special_tokens.items() if token is not None}
        (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n",
                                                        encoding="utf-8")


@functools.lru_cache
def _compile_chat_template(template: str):
    """The jinja2 environment of transformers' `_compile_jinja_template`: sandboxed, trim_blocks, lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps key order and does not escape HTML."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as error:
        raise ImportError("apply_chat_template needs jinja2: pip install 'minirlhf[chat]' (or pip install jinja2)"
                          ) from error

    class GenerationTag(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant masks, which
        # minirlhf does not build: render the body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
