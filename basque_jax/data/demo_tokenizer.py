"""An offline stand-in for the Llama 3 tokenizer: byte-level BPE trained on the embedded sample.

Same pre-tokenizer regex and byte-level alphabet as Llama 3, a small vocabulary (default 1024
BPE entries), and the 256 Llama 3.1 special tokens appended at the END of the vocabulary (so
the chat-template code works unchanged, looking special tokens up by name). Training is
deterministic; the result is cached as ``tokenizer.json`` in a directory keyed by the sample's
and the settings' hash.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from basque_jax.cache import default_cache_dir
from basque_jax.data.embedded import embedded_texts
from basque_jax.data.tokenizer import LLAMA3_PATTERN, LLAMA31_SPECIAL_TOKENS, Tokenizer

DEFAULT_VOCAB = 1024


def train_demo_backend(texts: list[str], vocab_size: int = DEFAULT_VOCAB) -> tokenizers.Tokenizer:
    """Trains the byte-level BPE (``vocab_size`` BPE entries) and appends the special tokens."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in LLAMA31_SPECIAL_TOKENS]
    )
    return tok


def build_demo_tokenizer(
    cache_dir: str | os.PathLike | None = None, *, vocab_size: int = DEFAULT_VOCAB
) -> Tokenizer:
    """The demo tokenizer, trained once and cached under ``cache_dir``."""
    texts = embedded_texts()
    key = hashlib.sha256(
        "\x00".join([tokenizers.__version__, str(vocab_size), *texts]).encode()
    ).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"demo_tokenizer-{vocab_size}-{key}" / "tokenizer.json"
    if path.exists():
        backend = tokenizers.Tokenizer.from_file(str(path))
    else:
        backend = train_demo_backend(texts, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        backend.save(str(tmp))
        os.replace(tmp, path)
    return Tokenizer(backend, name=f"demo-{vocab_size}")
