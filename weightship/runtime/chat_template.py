"""A model's own chat template (Jinja), rendered as transformers' ``apply_chat_template`` does.

Templates come with the model (``tokenizer_config.json``'s ``chat_template``, kept from a GGUF's
``tokenizer.chat_template``), so they are untrusted code: rendered in Jinja's immutable sandbox,
with the environment transformers gives them (``utils/chat_template_utils.py``): ``trim_blocks``
and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a
``tojson`` that does not escape HTML, and the special tokens by name (``bos_token``, …). The
messages are plain dicts of role and content; ``add_generation_prompt`` opens the assistant's turn.

:meth:`ChatTemplate.render_parts` also says which pieces of the prompt are the messages' contents,
so that a tokenizer can encode the template's own text (its special tokens) apart from a content's
(in which a special token's text is only text).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from weightship.errors import CatalogError, InvalidRequestError


class ChatTemplate:
    """A compiled template; :meth:`render` turns a conversation into the prompt's text."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._errors: tuple[type[Exception], ...] = (jinja2.exceptions.TemplateError, TypeError, ValueError)
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise CatalogError(f"the model's chat template does not compile: {e}") from e
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (a template's own refusal is a 400, naming it)."""
        try:
            return str(self.template.render(messages=[dict(m) for m in messages],
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens))
        except self._errors as e:
            raise InvalidRequestError(f"the model's chat template refused the messages: {e}",
                                      param="messages") from None

    def render_parts(self, messages: Sequence[Mapping[str, str]], *,
                     add_generation_prompt: bool = True) -> list[tuple[str, bool]] | None:
        """The prompt text of ``messages`` as pieces ``(text, is_content)``: the template's own
        text, and each message's content where the template put it. ``None`` when the template
        does more with a content than write it whole or trimmed (Jinja's ``trim``).

        The template is rendered once with each content replaced by a marker no text holds (a
        random nonce between private-use characters) and once as it is; the pieces between the
        markers must then spell the real prompt around the contents.
        """
        nonce = secrets.token_hex(8)
        marked = self.render([{**m, "content": f"\ue000{nonce}.{i}\ue001"} for i, m in enumerate(messages)],
                             add_generation_prompt=add_generation_prompt)
        text = self.render(messages, add_generation_prompt=add_generation_prompt)
        pieces = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", marked)  # [own, index, own, index, …, own]
        parts: list[tuple[str, bool]] = []
        at = 0
        for k in range(0, len(pieces), 2):
            own = pieces[k]
            if not text.startswith(own, at):
                return None
            at += len(own)
            parts.append((own, False))
            if k + 1 == len(pieces):
                break
            content, following = messages[int(pieces[k + 1])]["content"], pieces[k + 2]
            fitted = next((c for c in (content, content.strip()) if text.startswith(c + following, at)), None)
            if fitted is None:
                return None
            at += len(fitted)
            parts.append((fitted, True))
        return [p for p in parts if p[0]] if at == len(text) else None
