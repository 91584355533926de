"""Token log-probabilities, and the two shapes the OpenAI API returns them in.

The values are the model's own: ``log_softmax`` of the raw logits in float32, before
temperature, top-k, top-p and the penalties reshape the distribution a token is drawn from
(vLLM's default since its V1 engine). Scoring a text, which is what ``echo`` with ``logprobs``
is for (lm-evaluation-harness's loglikelihood), needs exactly these.

- Completions (``logprobs: k``): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``,
  one entry per token; with ``echo`` the prompt's tokens come first, the very first with a null
  log-probability (nothing predicts it).
- Chat (``logprobs: true, top_logprobs: k``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs"}]}``, where ``bytes`` are the token's exact UTF-8 bytes (a byte-fallback token
  may hold part of a character). The entries are the content's tokens, as the content has them:
  joined, they are the message's content. So the answer's first token comes without the space
  SentencePiece puts in front of a text (which decoding drops), as do its alternatives, and the
  ``</s>`` that ended the answer has no entry (it is not content).

The ``token`` text of a token that holds only part of a character (a byte-fallback token such
as ``<0xE2>``) is U+FFFD, as OpenAI's is: only ``bytes`` join exactly to the content's UTF-8.
A stop string's tokens have no entry (the engine holds an entry back with its text while it may
begin a stop string, :meth:`~weightship.runtime.request.Request.release`); a token that a stop
string begins inside keeps its entry, whose text then runs past the content's end.

Reference: the OpenAI API reference, "Completions" and "Chat", the ``logprobs`` objects.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from weightship.runtime.tokenizer import Tokenizer

_FLOOR = -9999.0  # what OpenAI reports for a probability that underflows (JSON has no -inf)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability (None: the first prompt token) and its ``top`` alternatives."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, V] (float32) of logits [n, V]: a new tensor, so the logits' buffer
    (a CUDA graph's output) may be overwritten while these wait for their tokens."""
    return torch.log_softmax(logits.float(), dim=-1)


def pick(lp: torch.Tensor, tokens: Sequence[int], tops: Sequence[int]) -> list[TokenLogprob]:
    """Token ``tokens[i]``'s entry of row ``i`` of ``lp`` [n, V], with its ``tops[i]`` most likely
    alternatives. One transfer to the host for all rows."""
    index = torch.tensor(list(tokens), device=lp.device).unsqueeze(1)  # [n, 1]
    chosen: list[float] = lp.gather(1, index)[:, 0].tolist()  # [n]
    k = max(tops, default=0)
    values: list[list[float]] = [[] for _ in tokens]
    ids: list[list[int]] = [[] for _ in tokens]
    if k:
        top = lp.topk(k, dim=-1)  # [n, k] each
        values, ids = top.values.tolist(), top.indices.tolist()
    return [TokenLogprob(token, max(c, _FLOOR),
                         tuple((i, max(v, _FLOOR)) for i, v in zip(row_ids[:n], row_values[:n], strict=True)))
            for token, c, n, row_ids, row_values in zip(tokens, chosen, tops, ids, values, strict=True)]


class TextOffsets:
    """Where each token of a completion starts in its text, in characters, token after token.

    Bytes go through an incremental UTF-8 decoder, so the byte-fallback tokens of one character
    all start where it does. An echoed prompt's text lacks the space SentencePiece puts in front
    of its first word (``skip_dummy_space``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_dummy_space: bool = False) -> None:
        self.tokenizer = tokenizer
        self.offset = 0
        self.skip_space = skip_dummy_space
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, token: int) -> int:
        """``token``'s offset; the next token's starts after it."""
        at = self.offset
        if not self.tokenizer.is_control(token):  # <s>, </s>: no text of their own
            raw = self.tokenizer.token_bytes(token)
            if self.skip_space:
                raw, self.skip_space = raw.removeprefix(b" "), False
            self.offset += len(self.decoder.decode(raw))
        return at


def completion_logprobs(entries: Sequence[TokenLogprob], tokenizer: Tokenizer,
                        offsets: TextOffsets) -> dict[str, list[Any]]:
    """The completions ``logprobs`` object of ``entries`` (offsets carry on from earlier chunks)."""
    return {"tokens": [tokenizer.token_text(e.token) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [None if e.logprob is None else {tokenizer.token_text(t): lp for t, lp in e.top}
                             for e in entries],
            "text_offset": [offsets(e.token) for e in entries]}


class ChatLogprobs:
    """The chat ``logprobs.content`` entries of one answer, chunk after chunk (see the module
    docstring: the entries' texts, joined, are the content)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.started = False  # the content's first token has had its entry

    def __call__(self, entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
        tok = self.tokenizer
        out = []
        for e in entries:
            if tok.is_control(e.token):  # </s>, <s>: not content
                continue
            first, self.started = not self.started, True
            out.append(self._one(e.token, e.logprob, first)
                       | {"top_logprobs": [self._one(t, lp, first) for t, lp in e.top]})
        return out

    def _one(self, token: int, logprob: float | None, first: bool) -> dict[str, Any]:
        raw = self.tokenizer.token_bytes(token)
        if first and self.tokenizer.drops_leading_space(token):
            raw = raw.removeprefix(b" ")
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


class ResponseLogprobs:
    """A response's ``logprobs`` objects, per choice and chunk after chunk: the chat shape, or
    the completions shape (whose text offsets carry on from a choice's earlier chunks; with
    ``echo`` the text starts with the prompt's, without SentencePiece's leading space)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool, echo: bool) -> None:
        self.tokenizer, self.chat, self.echo = tokenizer, chat, echo
        self.offsets: dict[int, TextOffsets] = {}
        self.chats: dict[int, ChatLogprobs] = {}

    def __call__(self, index: int, entries: list[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            if index not in self.chats:
                self.chats[index] = ChatLogprobs(self.tokenizer)
            return {"content": self.chats[index](entries)}
        if index not in self.offsets:
            self.offsets[index] = TextOffsets(self.tokenizer, skip_dummy_space=self.echo)
        return completion_logprobs(entries, self.tokenizer, self.offsets[index])

