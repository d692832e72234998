"""Tokenizers: Llama 3 tiktoken files, Hugging Face folders, the offline demo tokenizer.

``Tokenizer.encode`` encodes *content* with special-token parsing OFF: the characters
``<|eot_id|>`` inside a document or a user message are ordinary text and never become id
128009. Special tokens are only ever inserted by id (see ``chat.py``) or by encoding a chat
template's own literal text with ``encode_template`` (see ``templates.py``).

``load_tokenizer(path)`` accepts
- a Llama 3 ``tokenizer.model`` (tiktoken BPE ranks), or a folder holding only that file
  (Meta's ``original/`` layout): converted with transformers' ``TikTokenConverter`` and given
  the 256 Llama 3.1 special tokens (ids 128000-128255);
- a Hugging Face tokenizer folder (``tokenizer.json``), read with ``AutoTokenizer``;
- a ``tokenizer.json`` file;
- ``"demo"``: the small byte-level BPE trained on the embedded Basque sample (offline);
- a named model (``smollm2-135m-instruct``): its converted folder's tokenizer.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from basque_jax.errors import InputNotFound

# Llama 3 pre-tokenizer regex (from Meta's tokenizer.py; same as transformers' converter).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
ENDOFTEXT = "<|endoftext|>"  # GPT-2 style document separator (SmolLM2, ...)
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
NUM_LLAMA3_BASE_TOKENS = 128_000

# The 256 special tokens of Llama 3.1, in id order (128000 + index), as in its HF tokenizer.
LLAMA31_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    "<|eom_id|>",
    EOT,
    "<|python_tag|>",
) + tuple(f"<|reserved_special_token_{i}|>" for i in range(3, 248))
assert len(LLAMA31_SPECIAL_TOKENS) == 256


class Tokenizer:
    """A ``tokenizers.Tokenizer`` whose ``encode`` never parses special tokens.

    bos/eos: the document delimiters (``<|begin_of_text|>`` / ``<|end_of_text|>`` for Llama 3;
    note that Llama 3.1 Instruct's HF ``eos_token`` is ``<|eot_id|>``, not the document end).
    chat_template: the Hugging Face tokenizer's own Jinja chat template, if it has one.
    special_tokens_map: the token strings a chat template reads (``bos_token``, ``eos_token``,
    ...), as transformers passes them; defaults to ``bos_token``/``eos_token`` above.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        name: str = "",
        chat_template: str | None = None,
        special_tokens_map: dict[str, str] | None = None,
    ):
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        if special_tokens_map is None:
            pairs = (("bos_token", bos_token), ("eos_token", eos_token))
            special_tokens_map = {k: v for k, v in pairs if v is not None}
        self.special_tokens_map = dict(special_tokens_map)
        self._json = backend.to_str()
        self._setup()

    def _setup(self) -> None:
        self._backend = tokenizers.Tokenizer.from_str(self._json)
        self._backend.encode_special_tokens = True  # content: special strings are plain text
        self._template_backend: tokenizers.Tokenizer | None = None  # parses them (lazy)
        self._special_ids = frozenset(
            i for i, t in self._backend.get_added_tokens_decoder().items() if t.special
        )
        self.bos_id = self.token_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_id(self.eos_token) if self.eos_token else None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "_json": self._json,
            "name": self.name,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "special_tokens_map": self.special_tokens_map,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"chat_template": None, "special_tokens_map": {}, **state})
        self._setup()

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special (added) tokens."""
        return self._special_ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added, special-token strings stay text."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_template(self, text: str) -> list[int]:
        """Ids of a chat template's OWN literal text: special-token strings become their ids.
        Never use it on content (documents, messages)."""
        if self._template_backend is None:
            self._template_backend = tokenizers.Tokenizer.from_str(self._json)
            self._template_backend.encode_special_tokens = False
        return self._template_backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` over many texts (parallel in Rust)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of a vocabulary entry such as ``<|eot_id|>``; ``KeyError`` naming it if absent."""
        i = self._backend.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary of tokenizer {self.name!r}")
        return i

    def to_hf(self, chat_template: str | None = None) -> Any:
        """A transformers fast tokenizer with the same vocabulary (standard HF behaviour:
        it parses special tokens in text), e.g. for ``apply_chat_template`` or export."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizers.Tokenizer.from_str(self._json),
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            chat_template=chat_template,
        )

    def save(self, directory: str | os.PathLike, chat_template: str | None = None) -> None:
        """Writes a Hugging Face tokenizer folder (loadable by ``load_tokenizer``)."""
        self.to_hf(chat_template).save_pretrained(str(directory))


def from_tiktoken(path: str | os.PathLike) -> Tokenizer:
    """The Llama 3 tokenizer from its tiktoken ``tokenizer.model`` + 256 special tokens."""
    p = Path(path).resolve()
    if not p.is_file():
        raise InputNotFound(f"tokenizer file not found: {path}")
    st = p.stat()
    return _from_tiktoken_cached(str(p), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _from_tiktoken_cached(path: str, mtime_ns: int, size: int) -> Tokenizer:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    del mtime_ns, size  # cache key only
    backend = TikTokenConverter(
        vocab_file=path, pattern=LLAMA3_PATTERN, extra_special_tokens=list(LLAMA31_SPECIAL_TOKENS)
    ).converted()
    tok = Tokenizer(backend, name=path)
    base = tok.vocab_size - len(LLAMA31_SPECIAL_TOKENS)
    if tok.bos_id != base:
        raise ValueError(f"{path}: special tokens do not follow the {base} BPE ranks")
    return tok


def from_hf(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a Hugging Face folder (``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return from_transformers(hf, name=str(path))


def from_transformers(hf: Any, name: str = "") -> Tokenizer:
    """Wraps a loaded transformers fast tokenizer (its vocabulary, chat template and the
    special-token strings its template reads)."""
    backend = hf.backend_tokenizer
    vocab = backend.get_vocab(with_added_tokens=True)
    # Document delimiters: Llama 3's; otherwise a BOS only if the tokenizer itself adds one
    # (SmolLM2's bos_token <|im_start|> opens chat turns, not documents) and the end-of-text
    # separator the model was pre-trained with, before the chat eos.
    adds_bos = hf.bos_token_id is not None and hf("a").input_ids[:1] == [hf.bos_token_id]
    bos = BOS if BOS in vocab else hf.bos_token if adds_bos else None
    eos = EOS if EOS in vocab else ENDOFTEXT if ENDOFTEXT in vocab else hf.eos_token
    template = hf.chat_template
    if isinstance(template, dict):  # several named templates: the one apply_chat_template uses
        template = template.get("default")
    return Tokenizer(backend, bos_token=bos, eos_token=eos, name=name or hf.name_or_path,
                     chat_template=template, special_tokens_map=dict(hf.special_tokens_map))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from any of the forms listed in the module docstring."""
    if str(path) == "demo":
        from basque_jax.data.demo_tokenizer import build_demo_tokenizer

        return build_demo_tokenizer()
    from basque_jax.model.gguf import model_path

    p = model_path(path)
    if p.is_dir():
        if (p / "tokenizer.json").exists() or (p / "tokenizer_config.json").exists():
            return from_hf(p)
        if (p / "tokenizer.model").exists():
            return from_tiktoken(p / "tokenizer.model")
        raise InputNotFound(f"no tokenizer.json or tokenizer.model in {p}")
    if p.is_file():
        if p.suffix == ".json":
            backend = tokenizers.Tokenizer.from_file(str(p))
            vocab = backend.get_vocab(with_added_tokens=True)
            return Tokenizer(
                backend,
                bos_token=BOS if BOS in vocab else None,
                eos_token=EOS if EOS in vocab else None,
                name=str(p),
            )
        return from_tiktoken(p)
    raise InputNotFound(f"tokenizer not found: {path}")
