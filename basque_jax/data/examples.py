"""Training examples: raw record -> tokens + mask -> shifted, length-limited segments.

Each segment is built BEFORE packing: for tokens ``t`` and per-token mask ``m`` of one
document, ``input_ids = t[:-1]``, ``targets = t[1:]``, ``loss_mask = m[1:]`` -- so a target is
always the next token of the same document. Segments hold at most ``seq_len`` positions:
corpus documents longer than that are split into consecutive windows of ``seq_len + 1``
tokens overlapping by one (every target trained exactly once); over-long conversations are
truncated or dropped (``DataConfig.overlong``), counted either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from basque_jax.data.config import DataConfig, SourceConfig
from basque_jax.data.formats import BadRecord, Conversation, parse_record
from basque_jax.data.sources import RawRecord
from basque_jax.data.stats import ProcessedRecord
from basque_jax.data.templates import ChatTemplateError, ConversationEncoder, make_chat_encoder
from basque_jax.data.tokenizer import Tokenizer

Segment = dict[str, np.ndarray]


def make_segment(ids: Sequence[int], mask: Sequence[int]) -> Segment:
    """One shifted example from a token window and its per-token mask."""
    t = np.asarray(ids, dtype=np.int32)
    return {
        "input_ids": t[:-1],
        "targets": t[1:],
        "loss_mask": np.asarray(mask[1:], dtype=np.float32),
    }


def to_segments(
    ids: Sequence[int], mask: Sequence[int], seq_len: int, *, split: bool, overlong: str
) -> tuple[list[Segment], str | None]:
    """Segments of one tokenized record and a note (``split``/``truncated``/
    ``dropped_overlong`` or ``None``). Raises ``BadRecord`` if nothing would be trained."""
    if len(ids) < 2 or not any(mask[1:]):
        raise BadRecord("no trained tokens")
    if len(ids) - 1 <= seq_len:
        return [make_segment(ids, mask)], None
    if split:
        starts = range(0, len(ids) - 1, seq_len)
        segs = [make_segment(ids[s : s + seq_len + 1], mask[s : s + seq_len + 1]) for s in starts]
        return [s for s in segs if s["loss_mask"].any()], "split"
    if overlong == "drop" or not any(mask[1 : seq_len + 1]):
        return [], "dropped_overlong"
    return [make_segment(ids[: seq_len + 1], mask[: seq_len + 1])], "truncated"


class RecordProcessor:
    """``RawRecord -> ProcessedRecord``: decode, parse, apply the template, segment.

    Bad records come back with ``error`` set (never raised) so that they are counted.
    """

    def __init__(self, sources: Sequence[SourceConfig], tokenizer: Tokenizer, cfg: DataConfig):
        self._sources = {s.name: s for s in sources}
        self._tokenizer = tokenizer
        self._seq_len = cfg.seq_len
        self._overlong = cfg.overlong
        self._chat_args = {
            "setting": cfg.chat_template,
            "date_string": cfg.chat_date,
            "system_prompt": cfg.system_prompt,
        }
        self._encoder: ConversationEncoder | None = None
        _ = self.encoder  # an unusable template fails here, not as "every record is bad"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None}

    @property
    def encoder(self) -> ConversationEncoder:
        """The chat encoder (rebuilt lazily in each worker process)."""
        if self._encoder is None:
            self._encoder = make_chat_encoder(self._tokenizer, **self._chat_args)
        return self._encoder

    def tokenize(self, rec: RawRecord) -> tuple[list[int], list[int], bool]:
        """``(ids, mask, is_corpus)`` of one record; raises ``BadRecord``."""
        cfg = self._sources[rec.source]
        item = parse_record(
            rec.payload, cfg.kind, text_field=cfg.text_field, messages_field=cfg.messages_field
        )
        try:
            if isinstance(item, Conversation):
                try:
                    ids, mask = self.encoder.encode_chat(item.messages)
                except ChatTemplateError as e:  # e.g. a role the template refuses
                    raise BadRecord(f"chat template cannot encode it ({e})") from None
                return ids, mask, False
            ids = self.encoder.encode_document(item.text)
        except BadRecord:
            raise
        except Exception as e:  # the tokenizer rejected the text
            raise BadRecord(f"tokenizer error ({type(e).__name__})") from e
        return ids, [1] * len(ids), True

    def __call__(self, rec: RawRecord) -> ProcessedRecord:
        try:
            ids, mask, is_corpus = self.tokenize(rec)
            segments, note = to_segments(
                ids, mask, self._seq_len, split=is_corpus, overlong=self._overlong
            )
        except BadRecord as e:
            return ProcessedRecord(rec.source, rec.where, [], error=e.reason)
        return ProcessedRecord(rec.source, rec.where, segments, note=note)
