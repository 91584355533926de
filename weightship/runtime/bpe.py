"""A ``tokenizer.json`` tokenizer (the ``tokenizers`` library) and the model's own chat template:
the Llama family, such as SmolLM2's byte-level BPE with its ChatML template.

The directory's ``tokenizer_config.json`` names the special tokens, says whether a prompt starts
with the BOS token (SmolLM2's does not) and holds the chat template; ``generation_config.json``
may list more end-of-turn tokens. A chat is rendered to text by the template and tokenized as
transformers' ``apply_chat_template`` does: the special tokens the template writes (``<|im_start|>``)
become their single ids, and no BOS or EOS is added around it.

But a special token's text inside a message is text, as mistral-common encodes a message: were a
user's ``<|im_end|>\n<|im_start|>system`` read as those tokens, every user of a shared endpoint
could write the system's turn (transformers parses them: a prompt-injection vector). A chat whose
messages hold no special token's text is encoded whole, exactly as transformers does; one that
holds some is encoded in pieces (:meth:`ChatTemplate.render_parts`): the template's text with its
special tokens, the contents with none (so the tokens at a content's edges may differ from a
whole encoding's, for that request only). Roles are system, user and assistant: the template
writes the role into the prompt too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from weightship.errors import CatalogError, InvalidRequestError
from weightship.runtime.chat_template import ChatTemplate
from weightship.runtime.tokenizer import ChatMessage, Tokenizer, check_roles


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CatalogError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: not a JSON object")
    return data


def _token_name(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class BPETokenizer(Tokenizer):
    """Encode and decode with ``DIR/tokenizer.json``; chats through the model's template."""

    def __init__(self, directory: Path) -> None:
        from tokenizers import Tokenizer as HfTokenizer

        self.path = path = directory / "tokenizer.json"
        try:
            self.tok = HfTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for a bad file
            raise CatalogError(f"{path}: not a tokenizer.json: {e}") from e
        config = _read_json(directory / "tokenizer_config.json")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        names = {k: _token_name(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        specials = {i: t.content for i, t in self._added().items() if t.special}
        self._special_ids = frozenset(specials)
        # a special token's text, longest first at each place (the added-token matcher's order)
        self._special_text = re.compile("|".join(map(re.escape, sorted(specials.values(), key=len, reverse=True)))
                                         or r"(?!)")
        eos = self._id(names["eos_token"])
        if eos is None:
            raise CatalogError(f"{directory}: tokenizer_config.json names no eos_token of the vocabulary")
        self.eos_id = eos
        bos = self._id(names["bos_token"])
        self.bos_id = eos if bos is None else bos
        self.add_bos = bool(config.get("add_bos_token", False))
        self.add_eos = bool(config.get("add_eos_token", False))
        ends = _read_json(directory / "generation_config.json").get("eos_token_id", [])
        ends = [ends] if isinstance(ends, int) else ends
        self._stop = frozenset({eos, *(e for e in ends if isinstance(e, int) and 0 <= e < self.vocab_size)})
        template = config.get("chat_template")
        self.chat_template = ChatTemplate(template, names) if isinstance(template, str) else None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def _added(self) -> dict[int, Any]:
        """The added tokens (AddedToken: content, special) by id."""
        return dict(self.tok.get_added_tokens_decoder())

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; a prompt (``bos``) starts with BOS only if the model says so."""
        ids: list[int] = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    def token_bytes(self, token: int) -> bytes:
        return self._bytes[token]

    @cached_property
    def _bytes(self) -> list[bytes]:
        """Every token's bytes: a byte-level token's characters mapped back to the bytes GPT-2's
        alphabet spells, an added token's text as UTF-8."""
        from weightship.verify.gguf_tokenizer import byte_alphabet

        inverse = {c: b for b, c in byte_alphabet().items()}
        added = {i: t.content for i, t in self._added().items()}
        out = []
        for i in range(self.vocab_size):
            if i in added:
                out.append(added[i].encode())
                continue
            piece = self.tok.id_to_token(i) or ""
            out.append(bytes(inverse[c] for c in piece) if all(c in inverse for c in piece) else piece.encode())
        return out

    def drops_leading_space(self, token: int) -> bool:
        return False  # byte-level: a space is a byte of its own token, never a dummy prefix

    @cached_property
    def max_token_bytes(self) -> int:
        """The longest token's bytes, special tokens included (their text in a prompt is read as
        the one token); exact, as nothing is normalised away."""
        return max(len(b) for b in self._bytes)

    def is_control(self, token: int) -> bool:
        return token in self._special_ids

    @cached_property
    def _as_text(self) -> Any:
        """The tokenizer once more, reading special tokens' text as text (for message contents)."""
        from tokenizers import Tokenizer as HfTokenizer

        plain = HfTokenizer.from_file(str(self.path))
        plain.encode_special_tokens = True
        return plain

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The conversation rendered by the model's template, its reply's turn opened; special
        tokens only where the template writes them (see the module docstring)."""
        if self.chat_template is None:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        check_roles(messages)
        plain = [{"role": m.role, "content": m.content} for m in messages]
        if not any(self._special_text.search(m.content) for m in messages):
            return self.encode(self.chat_template.render(plain))
        parts = self.chat_template.render_parts(plain)
        if parts is None:
            raise InvalidRequestError(
                "a message holds a special token's text, and this model's chat template changes "
                "message contents in a way the server cannot follow to keep it text", param="messages")
        ids: list[int] = []
        for text, is_content in parts:
            ids += (self._as_text if is_content else self.tok).encode(text, add_special_tokens=False).ids
        return ids
