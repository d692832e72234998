"""Generated ids -> text, a piece at a time: incremental decoding and stop strings.

:class:`TextStream` turns the growing token list of one generated row into text deltas whose
concatenation is the decoded completion:

* decoding is incremental the way vLLM and TGI do it -- the ids since the last delivered piece
  are decoded together with a few ids before them (so a decoder that depends on context, e.g.
  SentencePiece's leading space, sees them) and only the new characters are kept; a piece
  ending in U+FFFD (a multi-byte character whose bytes are split between tokens) is held
  back until its remaining bytes arrive;
* stop strings: the text is cut before the first occurrence of any of them (the string itself
  is never delivered), and a tail that could still become one is held back until it either
  does or cannot any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str: ...


class TextStream:
    """Text deltas of one row: :meth:`update` with every token so far, ``final`` at the end.

    ``stopped`` turns true once a stop string has appeared; the text then ends before it and
    :meth:`update` delivers nothing more. ``text`` is everything delivered so far.
    """

    def __init__(self, tokenizer: Decoder, stops: Sequence[str] = (), *,
                 skip_special_tokens: bool = True) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._prefix_offset = 0  # ids decoded only as context for the next piece
        self._read_offset = 0  # ids whose text is in self._decoded
        self._decoded = ""  # text of ids[:read_offset] (not all of it delivered yet)
        self.text = ""  # delivered
        self.stopped = False

    def update(self, ids: Sequence[int], *, final: bool = False) -> str:
        """The new text to deliver, given all ``ids`` generated so far."""
        if self.stopped:
            return ""
        self._decoded += self._decode_new(ids, final)
        sent = len(self.text)
        cut = self._first_stop(sent)
        if cut is not None:
            self.stopped = True
        elif final:
            cut = len(self._decoded)
        else:
            cut = self._safe_end(sent)
        delta = self._decoded[sent:cut]
        self.text += delta
        return delta

    def _decode_new(self, ids: Sequence[int], final: bool) -> str:
        """Characters of the ids after ``read_offset`` (none while they end mid-character)."""
        if len(ids) <= self._read_offset:
            return ""
        context = self._decode(ids[self._prefix_offset:self._read_offset])
        full = self._decode(ids[self._prefix_offset:])
        if len(full) <= len(context) or (full.endswith(REPLACEMENT) and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return full[len(context):]

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip) if ids else ""

    def _first_stop(self, start: int) -> int | None:
        """Where the earliest stop string begins at or after ``start`` (a match never starts
        inside delivered text: a possible beginning of one is held back)."""
        found = [i for i in (self._decoded.find(s, start) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _safe_end(self, start: int) -> int:
        """End of the text that can be delivered: before the earliest tail that is the
        beginning of a stop string."""
        end = len(self._decoded)
        for i in range(max(start, end - self._longest + 1), end):
            tail = self._decoded[i:]
            if any(s.startswith(tail) for s in self.stops):
                return i
        return end
