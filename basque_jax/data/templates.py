"""Conversations -> token ids + loss mask with a model's own Jinja chat template (any backbone).

The template is rendered by transformers' own renderer
(``transformers.utils.chat_template_utils.render_jinja_template``: the sandboxed environment,
``raise_exception``, ``tojson``, ``strftime_now``...) with the variables ``apply_chat_template``
passes -- the tokenizer's ``special_tokens_map`` (``bos_token``, ``eos_token``...) -- plus
``date_string`` (Llama 3.x templates read it). A conversation is encoded in three steps:

1. a *probe* rendering with each message's content replaced by a unique sentinel gives the
   template's own literal text between contents (its *pieces*); it depends only on the roles
   and is cached;
2. the real rendering is matched against the pieces: each content must sit between two
   consecutive pieces, as is or stripped (Llama 3.1 applies ``| trim``). A template that
   rewrites content (``| upper``...) or drops a message is a :class:`ChatTemplateError` naming
   the template's source;
3. pieces are encoded with special-token parsing ON (``<|im_start|>`` is the token), contents
   with it OFF (``<|im_end|>`` typed by a user stays text), each on its own, so no BPE merge
   crosses a mask border. After the start, each is encoded behind a ``"\\n"`` that is removed
   again (transformers' ``encode_marked_chat`` trick), so SentencePiece-style tokenizers add
   no word-start marker mid-conversation.

Loss mask: 1 on every assistant content and on the template's text after it up to and
including the first special token there (its end of turn: ``<|im_end|>``, ``<|eot_id|>``);
0 elsewhere. For ordinary content the ids equal ``apply_chat_template(..., tokenize=True)``;
they differ where one-string tokenization would merge across a content border or parse
special-token strings typed inside content.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from basque_jax.data.chat import DEFAULT_DATE, ChatEncoder
from basque_jax.data.tokenizer import BOS, END_HEADER, EOT, START_HEADER, Tokenizer
from basque_jax.errors import ConfigError, UserError

Messages = Sequence[tuple[str, str]]
_PROBE = "\ue000{}\ue001"  # private-use characters: untouched by trim/upper/escape
_QUERY = "\ue002"  # stand-in content of the user turn that Magpie's pre-query prompt opens
# A short real conversation: the template must render it verbatim (checked at construction).
_CHECK = (("user", "Kaixo, zer moduz?"), ("assistant", "Ondo, eskerrik asko."),
          ("user", "Eta zu?"), ("assistant", "Ni ere bai."))


class ChatTemplateError(UserError):
    """A chat template cannot give ids and loss masks; the message names its source."""


class ConversationEncoder(Protocol):
    """What the data pipeline and the samplers need from a chat encoder."""

    stop_ids: tuple[int, ...]
    user_turn_stop_ids: tuple[int, ...]

    def encode_chat(
        self, messages: Messages, *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]: ...

    def encode_document(self, text: str) -> list[int]: ...

    def pre_query_ids(self, system_prompt: str | None = None) -> list[int]: ...


@functools.cache
def _renderer() -> Callable[..., tuple[list[str], list]]:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template


class TemplateEncoder:
    """Encodes conversations with a Jinja chat template and documents as ``BOS text EOS``.

    ``system_prompt`` is inserted as the system message of conversations that have none
    (empty: the template's own default, e.g. SmolLM2's "You are a helpful AI assistant...").
    ``stop_ids``: what ends a generated assistant reply -- the end-of-turn token the template
    puts after assistant contents, plus eos. ``user_turn_stop_ids``: every special token the
    template writes between a user content and the assistant content that follows (end of
    turn, next header), plus eos -- Magpie's stop set for a generated query.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str,
        *,
        source: str,
        date_string: str = DEFAULT_DATE,
        system_prompt: str = "",
    ):
        self.tokenizer = tokenizer
        self.template = template
        self.source = source
        self.date_string = date_string
        self.system_prompt = system_prompt
        self._variables = {**tokenizer.special_tokens_map, "date_string": date_string}
        self._probes: dict[tuple[tuple[str, ...], bool], tuple[list[str], list[list[int]]]] = {}
        self._newline = tokenizer.encode("\n")
        self._bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self._eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        self.encode_chat(_CHECK)  # fails early, naming the source, on an unusable template
        # _CHECK is user, assistant, user, assistant: pieces 1 and 3 follow a user content,
        # pieces 2 and 4 an assistant content (encode_chat checked they hold a special token).
        pieces = self._probe(tuple(r for r, _ in _CHECK), False)[1]
        closing = [self._first_special(pieces[k]) for k in (2, 4)]
        self.stop_ids: tuple[int, ...] = _unique([t for t in closing if t is not None]
                                                 + self._eos)
        specials = [t for t in pieces[1] + pieces[3] if t in tokenizer.special_ids]
        self.user_turn_stop_ids: tuple[int, ...] = _unique(specials + self._eos)

    def __repr__(self) -> str:
        return f"TemplateEncoder({self.source!r}, tokenizer={self.tokenizer.name!r})"

    def encode_chat(
        self, messages: Messages, *, add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """``(ids, mask)`` of a conversation given as ``(role, content)`` pairs."""
        messages = list(messages)
        if self.system_prompt and not (messages and messages[0][0] == "system"):
            messages.insert(0, ("system", self.system_prompt))
        return self._encode(messages, add_generation_prompt)

    def encode_document(self, text: str) -> list[int]:
        """``BOS + text + EOS`` (all tokens trained)."""
        return self._bos + self.tokenizer.encode(text) + self._eos

    def pre_query_ids(self, system_prompt: str | None = None) -> list[int]:
        """Magpie's prompt: the template up to where a user message's content starts.

        Without ``system_prompt`` the conversation has no system message, so the template's
        default system block (if any) comes first; with one, that system message does.
        """
        messages = [("system", system_prompt)] if system_prompt else []
        messages.append(("user", _QUERY))
        return self._encode(messages, False, upto=len(messages) - 1)[0]

    def _encode(
        self, messages: list[tuple[str, str]], add_generation_prompt: bool,
        upto: int | None = None,
    ) -> tuple[list[int], list[int]]:
        """Ids and mask (see module docstring); with ``upto``, stop where the content of
        message ``upto`` would start."""
        roles = tuple(r for r, _ in messages)
        pieces, encoded = self._probe(roles, add_generation_prompt)
        contents = self._locate(messages, pieces, add_generation_prompt)
        ids: list[int] = []
        mask: list[int] = []
        pos = 0
        for k, piece in enumerate(pieces):
            piece_ids = encoded[k]
            if k and pos == 0:  # nothing rendered before this piece: encode it as a start
                piece_ids = self._encode_text(piece, template=True, at_start=True)
            trained = 0
            if k and roles[k - 1] == "assistant":
                first = self._first_special(piece_ids)
                if first is None:
                    raise ChatTemplateError(
                        f"chat template {self.source}: no special token follows the content of "
                        f"assistant message {k - 1} (its end of turn, which the loss trains)"
                    )
                trained = piece_ids.index(first) + 1
            ids += piece_ids
            mask += [1] * trained + [0] * (len(piece_ids) - trained)
            pos += len(piece)
            if k == len(contents) or k == upto:
                break
            content_ids = self._encode_text(contents[k], template=False, at_start=pos == 0)
            ids += content_ids
            mask += [int(roles[k] == "assistant")] * len(content_ids)
            pos += len(contents[k])
        return ids, mask

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            rendered, _ = _renderer()(
                conversations=[messages], chat_template=self.template,
                add_generation_prompt=add_generation_prompt, **self._variables,
            )
        except jinja2.TemplateError as e:
            line = getattr(e, "lineno", None)
            where = f" line {line}" if line else ""
            reason = " ".join(str(e.message or type(e).__name__).split())
            raise ChatTemplateError(f"chat template {self.source}{where}: {reason}") from None
        return rendered[0]

    def _probe(
        self, roles: tuple[str, ...], add_generation_prompt: bool
    ) -> tuple[list[str], list[list[int]]]:
        """The template's literal text before, between and after the contents of ``roles``
        (its pieces), and their ids (special tokens parsed; the first as a start)."""
        key = (roles, add_generation_prompt)
        cached = self._probes.get(key)
        if cached is not None:
            return cached
        marks = [_PROBE.format(i) for i in range(len(roles))]
        text = self._render([{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)],
                            add_generation_prompt)
        pieces, rest = [], text
        for k, (role, mark) in enumerate(zip(roles, marks, strict=True)):
            times = text.count(mark)
            if times != 1 or mark not in rest:
                what = ("renders no content" if times == 0 else
                        f"renders the content {times} times" if times > 1 else
                        "renders the content out of order")
                raise ChatTemplateError(
                    f"chat template {self.source}: {what} for {role!r} message {k} "
                    f"(roles {list(roles)}); it must render each message's content once"
                )
            head, _, rest = rest.partition(mark)
            pieces.append(head)
        pieces.append(rest)
        encoded = [self._encode_text(p, template=True, at_start=k == 0)
                   for k, p in enumerate(pieces)]
        if len(self._probes) >= 1024:
            self._probes.clear()
        self._probes[key] = (pieces, encoded)
        return pieces, encoded

    def _locate(
        self, messages: list[tuple[str, str]], pieces: list[str], add_generation_prompt: bool
    ) -> list[str]:
        """Each message's content as the real rendering holds it (as is or stripped)."""
        text = self._render([{"role": r, "content": c} for r, c in messages],
                            add_generation_prompt)
        pos = len(pieces[0]) if text.startswith(pieces[0]) else -1
        found: list[str] = []
        for k, (role, content) in enumerate(messages):
            after = pieces[k + 1]
            last = k + 1 == len(messages)
            for cand in dict.fromkeys((content, content.strip(), content.lstrip(),
                                       content.rstrip())):
                end = pos + len(cand)
                if (pos >= 0 and text.startswith(cand, pos) and text.startswith(after, end)
                        and (not last or end + len(after) == len(text))):
                    found.append(cand)
                    pos = end + len(after)
                    break
            else:
                raise ChatTemplateError(
                    f"chat template {self.source}: cannot locate the content of {role!r} "
                    f"message {k} in the rendering; the template must render message content "
                    f"verbatim or stripped"
                )
        return found

    def _encode_text(self, text: str, *, template: bool, at_start: bool) -> list[int]:
        """Template text (special tokens parsed) or content (never), see module docstring."""
        if not text:
            return []
        encode = self.tokenizer.encode_template if template else self.tokenizer.encode
        if at_start:
            return encode(text)
        ids = encode("\n" + text)
        n = len(self._newline)
        return ids[n:] if ids[:n] == self._newline else encode(text)

    def _first_special(self, ids: list[int]) -> int | None:
        return next((t for t in ids if t in self.tokenizer.special_ids), None)


def _unique(ids: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(ids))


def has_llama31_tokens(tokenizer: Tokenizer) -> bool:
    """Whether ``tokenizer`` has the special tokens of the Llama 3.1 chat format."""
    try:
        for token in (BOS, START_HEADER, END_HEADER, EOT):
            tokenizer.token_id(token)
    except KeyError:
        return False
    return True


CHAT_TEMPLATE_SETTINGS = ("auto", "llama31", "llama3")


def check_chat_template_setting(setting: str, key: str = "data.chat_template") -> None:
    """ConfigError unless ``setting`` is auto, llama31, llama3 or a ``.jinja`` path."""
    if setting not in CHAT_TEMPLATE_SETTINGS and not setting.endswith(".jinja"):
        raise ConfigError(f"{key}: unknown value {setting!r}; use auto, llama31, llama3 or a "
                          "path ending in .jinja")


def make_chat_encoder(
    tokenizer: Tokenizer,
    setting: str,
    *,
    date_string: str = DEFAULT_DATE,
    system_prompt: str = "",
) -> ChatEncoder | TemplateEncoder:
    """The encoder of ``data.chat_template``: ``llama31``/``llama3`` (the exact piecewise
    :class:`ChatEncoder`), ``PATH.jinja`` (that template), or ``auto``: ``llama31`` for a
    tokenizer with the Llama 3.1 special tokens (the study's format, Magpie's bare pre-query
    prompt), else the tokenizer's own template."""
    if setting in ("llama31", "llama3"):
        return ChatEncoder(tokenizer, template=setting, date_string=date_string,
                           system_prompt=system_prompt)
    kwargs = {"date_string": date_string, "system_prompt": system_prompt}
    if setting == "auto":
        if has_llama31_tokens(tokenizer):
            return ChatEncoder(tokenizer, template="llama31", **kwargs)
        if tokenizer.chat_template:
            source = f"{tokenizer.name} (the tokenizer's chat_template)"
            return TemplateEncoder(tokenizer, tokenizer.chat_template, source=source, **kwargs)
        raise UserError(f"tokenizer {tokenizer.name!r} has no chat template; set "
                        f"data.chat_template to a .jinja file")
    if setting.endswith(".jinja"):
        path = Path(setting)
        if not path.is_file():
            raise UserError(f"data.chat_template: template file not found: {setting}")
        return TemplateEncoder(tokenizer, path.read_text(encoding="utf-8"), source=str(path),
                               **kwargs)
    raise UserError(f"data.chat_template: unknown value {setting!r}; use auto, llama31, llama3 "
                    f"or a path ending in .jinja")


TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "assets" / "chat_templates"


def shipped_template(encoder: ChatEncoder | TemplateEncoder) -> str:
    """A Jinja chat template rendering what ``encoder`` encodes (its date and default system
    message baked in), for exports: transformers and vLLM then prompt a trained model the way
    it was trained."""
    import json

    if isinstance(encoder, ChatEncoder):
        text = (TEMPLATES_DIR / f"{encoder.template}.jinja").read_text()
        sets = ""
        if encoder.template == "llama31":
            sets += f"{{%- set date_string = {json.dumps(encoder.date_string)} %}}\n"
    else:
        text, sets = encoder.template, ""
        if encoder.system_prompt:  # TemplateEncoder inserts it as the system message
            system = json.dumps(encoder.system_prompt)
            sets = ("{%- if not (messages and messages[0]['role'] == 'system') %}{%- set "
                    f"messages = [{{'role': 'system', 'content': {system}}}] + messages %}}"
                    "{%- endif %}\n")
        return sets + text
    if encoder.system_prompt:
        sets += f"{{%- set default_system_message = {json.dumps(encoder.system_prompt)} %}}\n"
    return sets + text
