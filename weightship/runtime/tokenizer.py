"""Tokenizers: the interface the engine and server use, Mistral's SentencePiece tokenizer with
the v1 instruct chat format, and streaming detokenization.

:func:`load_tokenizer` picks the implementation from the model directory: ``tokenizer.model``
(SentencePiece, Mistral) or ``tokenizer.json`` (a ``tokenizers`` BPE with the model's own chat
template, Llama family: :mod:`weightship.runtime.bpe`).

The Mistral chat format is mistral-common's ``InstructTokenizerV1``: ``<s>[INST] user [/INST]answer</s>``
with each part encoded on its own (so ``</s>`` is the real end-of-sequence token, never text),
and a system prompt merged into the first user message. A message's own ``</s>`` or ``<s>`` stays
text: SentencePiece never reads a control token from text (in the v1 format ``[INST]`` is text,
the template's too, as in mistral-common's ``InstructTokenizerV1``).

Streaming text is cut from the decoded tokens by difference (vLLM's ``detokenize_incrementally``):
decoding a window of recent tokens keeps SentencePiece's leading-space rule right, and a delta
that ends in an incomplete UTF-8 sequence (U+FFFD) is held back until the next tokens finish it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import sentencepiece as spm

from weightship.errors import CatalogError, InvalidRequestError

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded in front of a completion, so its first token's leading space survives.
_CONTEXT_TOKENS = 6
# A text whose normalisation differs from this probe's may be shortened by it (NFKC composes
# "b\u0301" into one character; whitespace removal drops runs of spaces): the prompt byte bound
# (Tokenizer.max_token_bytes) then gets this much room.
_NORMALISATION_PROBE = "a  b\u0301 \ufb01"
_SHORTENING_MARGIN = 4


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system | user | assistant
    content: str


CHAT_ROLES = ("system", "user", "assistant")


def check_roles(messages: Sequence[ChatMessage]) -> None:
    """Refuse a role other than system, user and assistant (tools are not served)."""
    for m in messages:
        if m.role not in CHAT_ROLES:
            raise InvalidRequestError(f"unsupported message role {m.role[:40]!a}: use system, user or assistant",
                                      param="messages")


class Tokenizer(ABC):
    """What the engine, the server and the log-probabilities need of a model's tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end a completion (the end of the model's turn)."""
        return frozenset({self.eos_id})

    @abstractmethod
    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``bos``: as the start of a prompt."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (control tokens decode to nothing)."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a control token: its name)."""

    def token_text(self, token: int) -> str:
        """:meth:`token_bytes` as text (a lone part of a character becomes U+FFFD)."""
        return self._texts[token]

    @cached_property
    def _texts(self) -> list[str]:
        return [self.token_bytes(i).decode("utf-8", errors="replace") for i in range(self.vocab_size)]

    @abstractmethod
    def drops_leading_space(self, token: int) -> bool:
        """Whether decoding drops the space in front of ``token`` when it begins a text."""

    @property
    @abstractmethod
    def max_token_bytes(self) -> int:
        """Bytes of prompt text one token can stand for, at most (a bound, see the server)."""

    @abstractmethod
    def is_control(self, token: int) -> bool:
        """Whether ``token`` is ``<s>``, ``</s>`` or the like: no text of its own."""

    @abstractmethod
    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt tokens of a conversation, in the model's chat format, its reply to come."""


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer of a model directory's ``tokenizer.model`` or ``tokenizer.json``."""
    if path.name == "tokenizer.json":
        from weightship.runtime.bpe import BPETokenizer

        return BPETokenizer(path.parent)
    return SentencePieceTokenizer(path)


class SentencePieceTokenizer(Tokenizer):
    """Encode and decode with a ``tokenizer.model``; Mistral's v1 instruct chat format."""

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
        return self._bytes[token]

    @cached_property
    def _bytes(self) -> list[bytes]:
        # every token's, once (tens of milliseconds): a response's log-probabilities name
        # hundreds of thousands of tokens, and each lookup through SentencePiece costs microseconds
        return [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, token: int) -> bytes:
        piece: str = self.sp.id_to_piece(token)
        if self.sp.is_byte(token):  # "<0xE2>"
            return bytes([int(piece[1:-1], 16)])
        if self.sp.is_unknown(token):  # decoded as " ⁇ ", not as its name
            return str(self.sp.decode([token])).encode()
        if self.sp.is_control(token):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()

    def drops_leading_space(self, token: int) -> bool:
        """Whether decoding drops the space in front of ``token`` when it begins a text (the
        dummy prefix SentencePiece adds when encoding): true of a piece such as "▁Blue", not of
        a byte-fallback token or ``<unk>``."""
        return (not self.sp.is_byte(token) and not self.sp.is_unknown(token)
                and not self.sp.is_control(token) and self.sp.id_to_piece(token).startswith("\u2581"))

    @cached_property
    def max_token_bytes(self) -> int:
        """Bytes of text one token can stand for, at most: a text of B UTF-8 bytes has at least
        B / max_token_bytes tokens, so a longer text than ``context × max_token_bytes`` is too
        long for the context without being tokenized. Exact for a model that normalises nothing
        away (Mistral's and Llama's: identity normalisation, spaces kept); one whose
        normalisation can shorten a text gets a margin of ``_SHORTENING_MARGIN``."""
        longest = max(len(b) for i, b in enumerate(self._bytes) if not self.sp.is_control(i))
        probe = _NORMALISATION_PROBE
        if str(self.sp.normalize(probe)) != "\u2581" + probe.replace(" ", "\u2581"):
            longest *= _SHORTENING_MARGIN
        return longest

    def is_control(self, token: int) -> bool:
        """Whether ``token`` is ``<s>``, ``</s>`` or the like: no text of its own."""
        return bool(self.sp.is_control(token))

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Prompt tokens of a conversation in the Mistral instruct (v1) format."""
        check_roles(messages)
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [m for m in messages if m.role != "system"]
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
