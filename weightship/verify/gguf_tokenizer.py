"""The ``tokenizer.json`` and ``tokenizer_config.json`` of a GGUF's byte-level BPE vocabulary.

A GGUF has no ``tokenizer.json``: it keeps the vocabulary (``tokenizer.ggml.tokens``), each
token's kind (``token_type``: 3 = control, 4 = user-defined), the merges and the special token
ids as metadata. This module writes them as the ``tokenizers`` library's JSON, the way
transformers builds its tokenizer for a GGUF (``integrations/gguf/gguf_tokenizer_mapping.py``:
GPT-2's byte-level pre-tokenizer and decoder, a BPE model without unknown token, control tokens
added as special tokens, user-defined ones as plain added tokens), so ``tokenizers`` and
transformers read the same tokenizer from the directory as transformers does from the GGUF.
The JSON is written by hand, keys sorted: the same GGUF gives the same bytes.

Only GPT-2-style byte-level vocabularies (``tokenizer.ggml.model = gpt2``) whose pre-tokenizer
is GPT-2's regex are converted; SentencePiece vocabularies (``llama``) and other split rules are
refused by name.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

from weightship.errors import MalformedGgufError, UnsupportedGgufError

# llama.cpp's names (tokenizer.ggml.pre) of vocabularies split by GPT-2's own regex, which is
# the ByteLevel pre-tokenizer's. "smollm" splits digits one by one first; SmolLM2's merges
# join no digits, so the tokens are the same (and transformers reads the file this way).
GPT2_SPLIT = frozenset({"default", "gpt-2", "gpt2", "smollm"})
CONTROL, USER_DEFINED = 3, 4


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _spelled(token: str, alphabet: frozenset[str]) -> str:
    """A token in the byte alphabet, as it is; any other spelled by its UTF-8 bytes."""
    if set(token) <= alphabet:
        return token
    table = byte_alphabet()
    return "".join(table[b] for b in token.encode("utf-8"))


def tokenizer_json(path: str, tokens: Sequence[str], token_types: Sequence[int], merges: Sequence[str],
                   pre: str | None) -> dict[str, Any]:
    """The ``tokenizer.json`` document of a byte-level BPE vocabulary."""
    if pre is not None and pre not in GPT2_SPLIT:
        raise UnsupportedGgufError(f"{path}: its tokenizer splits text by llama.cpp's {pre!r} rule, which "
                                   "weightship does not convert", hint="converted: " + ", ".join(sorted(GPT2_SPLIT)))
    if token_types and len(token_types) != len(tokens):
        raise MalformedGgufError(path, f"{len(token_types)} token types for {len(tokens)} tokens")
    alphabet = frozenset(byte_alphabet().values())
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        key = _spelled(token, alphabet)
        if key in vocab:
            raise MalformedGgufError(path, f"token {token!r} appears twice in the vocabulary ({vocab[key]}, {i})")
        vocab[key] = i
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or " " in right or left not in vocab or right not in vocab or left + right not in vocab:
            raise MalformedGgufError(path, f"merge {m!r} does not join two tokens of the vocabulary into a third")
        pairs.append(m)
    added = []
    for i, (token, kind) in enumerate(zip(tokens, token_types, strict=False)):
        # a control token outside the byte alphabet is a llama.cpp mislabel: transformers skips it
        special = kind == CONTROL and set(token) <= alphabet
        if special or kind == USER_DEFINED:
            added.append({"content": token, "id": i, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": special})
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": True}
    return {
        "added_tokens": added,
        "decoder": {**byte_level, "add_prefix_space": True},
        "model": {"byte_fallback": False, "continuing_subword_prefix": None, "dropout": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "ignore_merges": False, "merges": pairs,
                  "type": "BPE", "unk_token": None, "vocab": vocab},
        "normalizer": None,
        "padding": None,
        "post_processor": None,
        "pre_tokenizer": byte_level,
        "truncation": None,
        "version": "1.0",
    }


def tokenizer_config(tokens: Sequence[str], special: dict[str, int | None], *, add_bos: bool, add_eos: bool,
                     chat_template: str | None, max_length: int) -> dict[str, Any]:
    """``tokenizer_config.json``: the special tokens by name, whether a BOS is added, the chat
    template (kept as the GGUF has it) and the context length."""
    config: dict[str, Any] = {"add_bos_token": add_bos, "add_eos_token": add_eos,
                              "clean_up_tokenization_spaces": False, "model_max_length": max_length,
                              "tokenizer_class": "PreTrainedTokenizerFast"}
    for name, token_id in special.items():
        config[name] = tokens[token_id] if token_id is not None else None
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def dumps(document: dict[str, Any]) -> bytes:
    """Deterministic JSON bytes (sorted keys, UTF-8, a final newline)."""
    return (json.dumps(document, ensure_ascii=False, sort_keys=True, indent=1) + "\n").encode()
