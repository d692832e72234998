"""Model answers as the page shows them: Markdown, but never raw HTML."""

from __future__ import annotations

import html
import re

_CODE = re.compile(r"(```[\s\S]*?(?:```|$)|~~~[\s\S]*?(?:~~~|$)|`[^`\n]*`)")


def answer_markdown(text: str) -> str:
    """``text`` with HTML escaped outside code, so ``<div>`` in an answer is shown as text
    instead of being interpreted or stripped by the page's sanitiser; code spans and fenced
    blocks (possibly still open while streaming) are left alone, Markdown shows them as is."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else html.escape(part, quote=False)
                   for i, part in enumerate(parts))
