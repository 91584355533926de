"""Mistral's SentencePiece tokenizer, the v1 instruct chat format, and streaming detokenization.

The chat format is mistral-common's ``InstructTokenizerV1``: ``<s>[INST] user [/INST]answer</s>``
with each part encoded on its own (so ``</s>`` is the real end-of-sequence token, never text),
and a system prompt merged into the first user message.

Streaming text is cut from the decoded tokens by difference (vLLM's ``detokenize_incrementally``):
decoding a window of recent tokens keeps SentencePiece's leading-space rule right, and a delta
that ends in an incomplete UTF-8 sequence (U+FFFD) is held back until the next tokens finish it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from weightship.errors import CatalogError, InvalidRequestError

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of a completion, so its first token's leading space survives.
_CONTEXT_TOKENS = 6


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


class Tokenizer:
    """Encode and decode with a ``tokenizer.model``."""

    def __init__(self, path: Path) -> None:
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise CatalogError(f"{path}: not a SentencePiece model: {e}") from e
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``."""
        ids: list[int] = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (control tokens decode to nothing)."""
        return str(self.sp.decode(list(ids)))

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: a piece's text with "▁" as a space, a byte-fallback
        token's byte, a control token's name (``</s>``)."""
        piece: str = self.sp.id_to_piece(token)
        if self.sp.is_byte(token):  # "<0xE2>"
            return bytes([int(piece[1:-1], 16)])
        if self.sp.is_control(token) or self.sp.is_unknown(token):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    def is_control(self, token: int) -> bool:
        """Whether ``token`` is ``<s>``, ``</s>`` or the like: no text of its own."""
        return bool(self.sp.is_control(token))

    def token_text(self, token: int) -> str:
        """:meth:`token_bytes` as text (a lone part of a character becomes U+FFFD)."""
        return self.token_bytes(token).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt tokens of a conversation in the Mistral instruct (v1) format."""
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
        for m in turns:
            if m.role not in ("user", "assistant"):
                raise InvalidRequestError(f"unsupported message role {m.role!r}", param="messages")
        if not turns or turns[-1].role != "user":
            raise InvalidRequestError("the conversation must end with a user message", param="messages")
        ids = [self.bos_id]
        for i, m in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise InvalidRequestError(
                    f"messages must alternate user/assistant starting with user; message {i} is "
                    f"{m.role!r}", param="messages")
            if m.role == "user":
                content = f"{system}\n\n{m.content}" if i == 0 and system else m.content
                ids += self.encode(f"[INST] {content} [/INST]")
            else:
                ids += self.encode(m.content, eos=True)
        return ids


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that concatenate to the full text."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the window decoded for the next delta
        self.read_offset = len(self.ids)  # tokens before this one have been emitted as text

    def push(self, token: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end of the stream)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) and not final:
            return ""
        if text.endswith(_REPLACEMENT) and not final:
            return ""
        # Keep the window short: the next delta is decoded from the tokens just emitted on.
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]
