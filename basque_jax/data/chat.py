"""Chat template -> token ids + loss mask (Llama 3.1 format), and corpus documents -> ids.

The ids are built piece by piece -- special tokens by id, header roles, and each message's
content encoded on its own with special-token parsing off -- so no BPE merge crosses a mask
border and user text can never forge a special token. For ordinary content the result equals
``transformers``' ``apply_chat_template`` with the study's Jinja template
(``chat_template_llama31.jinja``), which the tests check on real data:

    <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n
    Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n{system}<|eot_id|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|> ...

The system block is always emitted (empty system message included). Loss mask: 1 on the
assistant content tokens and their ``<|eot_id|>``, 0 elsewhere. ``template="llama3"`` is Meta's
reference format (no forced system block, no date lines).

Corpus documents are ``<|begin_of_text|>`` + text + ``<|end_of_text|>``, every token trained.
"""

from __future__ import annotations

from collections.abc import Sequence

from basque_jax.data.tokenizer import BOS, END_HEADER, EOS, EOT, START_HEADER, Tokenizer

CUTTING_KNOWLEDGE = "December 2023"
DEFAULT_DATE = "26 Jul 2024"


class ChatEncoder:
    """Encodes conversations and documents for one tokenizer and template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        template: str = "llama31",
        date_string: str = DEFAULT_DATE,
        system_prompt: str = "",
    ):
        if template not in ("llama31", "llama3"):
            raise ValueError(f"unknown chat template {template!r} (llama31 or llama3)")
        self.tokenizer = tokenizer
        self.template = template
        self.date_string = date_string
        self.system_prompt = system_prompt
        self._start = tokenizer.token_id(START_HEADER)
        self._end = tokenizer.token_id(END_HEADER)
        self._eot = tokenizer.token_id(EOT)
        self._bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self._eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self._newlines = tokenizer.encode("\n\n")
        self._headers: dict[str, list[int]] = {}
        preamble = f"\n\nCutting Knowledge Date: {CUTTING_KNOWLEDGE}\nToday Date: {date_string}\n\n"
        self._system_preamble = tokenizer.encode(preamble)

    def header(self, role: str) -> list[int]:
        """``<|start_header_id|>role<|end_header_id|>`` followed by ``\\n\\n``."""
        ids = self._headers.get(role)
        if ids is None:
            ids = [self._start, *self.tokenizer.encode(role), self._end, *self._newlines]
            self._headers[role] = ids
        return ids

    def encode_chat(
        self, messages: Sequence[tuple[str, str]], *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(ids, mask)`` of a conversation given as ``(role, content)`` pairs."""
        enc = self.tokenizer.encode
        ids, mask = list(self._bos), [0] * len(self._bos)
        messages = list(messages)
        if messages and messages[0][0] == "system":
            system = messages.pop(0)[1].strip()
        else:
            system = self.system_prompt.strip()
        if self.template == "llama31":
            block = [self._start, *self.tokenizer.encode("system"), self._end]
            block += self._system_preamble + (enc(system) if system else []) + [self._eot]
            ids += block
            mask += [0] * len(block)
        elif system:
            messages.insert(0, ("system", system))
        for role, content in messages:
            head = self.header(role)
            body = enc(content.strip()) + [self._eot]
            ids += head + body
            trained = 1 if role == "assistant" else 0
            mask += [0] * len(head) + [trained] * len(body)
        if add_generation_prompt:
            head = self.header("assistant")
            ids += head
            mask += [0] * len(head)
        return ids, mask

    def encode_document(self, text: str) -> list[int]:
        """``BOS + text + EOS`` (all tokens trained)."""
        return self._bos + self.tokenizer.encode(text) + self._eos

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """What ends a generated assistant turn: ``<|eot_id|>``, ``<|end_of_text|>``,
        ``<|eom_id|>`` (Meta's generation config of Llama 3.1 Instruct)."""
        return self._ids(EOT, EOS, "<|eom_id|>")

    @property
    def user_turn_stop_ids(self) -> tuple[int, ...]:
        """Magpie's stop set for a generated user query: ``<|eot_id|>`` 128009,
        ``<|end_of_text|>`` 128001 and the header markers 128006/128007."""
        return self._ids(EOT, EOS, START_HEADER, END_HEADER)

    def pre_query_ids(self, system_prompt: str | None = None) -> list[int]:
        """Magpie's pre-query prompt for Llama 3: ``<|begin_of_text|>`` (+ a bare system
        block ``<|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>`` when given)
        + ``<|start_header_id|>user<|end_header_id|>\\n\\n`` -- no dated system block."""
        ids = [self.tokenizer.token_id(BOS)]
        if system_prompt:
            ids += self.header("system") + self.tokenizer.encode(system_prompt.strip())
            ids.append(self._eot)
        return ids + self.header("user")

    def _ids(self, *tokens: str) -> tuple[int, ...]:
        out = []
        for t in tokens:
            try:
                out.append(self.tokenizer.token_id(t))
            except KeyError:
                continue
        return tuple(out)
