"""The Mistral architecture's hyper-parameters, and the tensors they imply in each layout.

Two layouts carry the same model (DESIGN.md):
- ``original``: Mistral's release, ``params.json`` + ``consolidated.00.pth`` with names such as
  ``layers.0.attention.wq.weight``;
- ``hf``: the Hugging Face layout, ``config.json`` + ``model*.safetensors`` with names such as
  ``model.layers.0.self_attn.q_proj.weight``, and the rows of ``wq``/``wk`` permuted for the
  half-split rotary convention (see :func:`permute_for_hf`).

References: mistral-inference ``args.py``; transformers ``convert_mistral_weights_to_hf.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weightship.errors import CatalogError


@dataclass(frozen=True)
class Architecture:
    """Hyper-parameters of a Mistral- or Llama-family model, named as in ``params.json``."""

    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int  # SwiGLU inner width
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    # Tokens a position attends to, itself included; None = full causal attention.
    sliding_window: int | None = None
    # Longest sequence the model is meant for (HF's max_position_embeddings).
    max_seq_len: int = 32768
    # The output projection is the embedding matrix itself (no output.weight / lm_head.weight):
    # small Llama models such as SmolLM2 save a vocabulary-sized matrix this way.
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads",
                      "vocab_size", "max_seq_len"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CatalogError(f"architecture: {field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise CatalogError(
                f"architecture: n_heads ({self.n_heads}) must be a multiple of "
                f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise CatalogError(f"architecture: head_dim must be even for rotary, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise CatalogError(f"architecture: sliding_window must be positive, got {self.sliding_window}")

    # ---- conversions ------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Architecture:
        """Build from a catalog card's ``architecture:`` block or a ``params.json``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names - {"max_position_embeddings", "model_type"}
        known = {k: v for k, v in data.items() if k in names}
        if "max_position_embeddings" in data and "max_seq_len" not in known:
            known["max_seq_len"] = data["max_position_embeddings"]
        del unknown  # params.json files carry extra keys (e.g. "moe"); they do not change shapes
        try:
            return cls(**known)
        except TypeError as e:
            raise CatalogError(f"architecture: {e}") from e

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> Architecture:
        """Build from a Hugging Face ``config.json`` of ``model_type`` mistral or llama (a Llama
        is a Mistral without a sliding window, its embeddings possibly tied)."""
        model_type = config.get("model_type", "mistral")
        if model_type not in ("mistral", "llama"):
            raise CatalogError(f"config.json: model_type {model_type!r} is not served",
                               hint="served: mistral, llama")
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or rope
        if scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise CatalogError(f"config.json: rope scaling {scaling!r} is not supported")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise CatalogError("config.json: attention or MLP biases are not supported")
        try:
            n_heads = int(config["num_attention_heads"])
            dim = int(config["hidden_size"])
            return cls(
                dim=dim,
                n_layers=int(config["num_hidden_layers"]),
                head_dim=int(config.get("head_dim") or dim // n_heads),
                hidden_dim=int(config["intermediate_size"]),
                n_heads=n_heads,
                n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
                norm_eps=float(config["rms_norm_eps"]),
                vocab_size=int(config["vocab_size"]),
                rope_theta=float(config.get("rope_theta", rope.get("rope_theta", 10000.0))),
                sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
                max_seq_len=int(config.get("max_position_embeddings", 32768)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CatalogError(f"config.json is not a {model_type} config: {e!r}") from e

    def to_params_json(self) -> dict[str, Any]:
        """The ``params.json`` of the original layout."""
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps, "vocab_size": self.vocab_size, "rope_theta": self.rope_theta,
        }
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        return out

    def to_hf_config(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The ``config.json`` of the HF layout (``MistralForCausalLM``)."""
        return {
            "architectures": ["MistralForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.dim,
            "initializer_range": 0.02,
            "intermediate_size": self.hidden_dim,
            "max_position_embeddings": self.max_seq_len,
            "model_type": "mistral",
            "num_attention_heads": self.n_heads,
            "num_hidden_layers": self.n_layers,
            "num_key_value_heads": self.n_kv_heads,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    # ---- tensors ----------------------------------------------------------------------------

    def tensor_shapes(self, layout: str) -> dict[str, tuple[int, ...]]:
        """Every weight tensor's name and shape in ``layout`` ("original" or "hf")."""
        q_out, kv_out = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "tok_embeddings.weight": (self.vocab_size, self.dim),
            "norm.weight": (self.dim,),
        }
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, self.dim)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes |= {
                p + "attention.wq.weight": (q_out, self.dim),
                p + "attention.wk.weight": (kv_out, self.dim),
                p + "attention.wv.weight": (kv_out, self.dim),
                p + "attention.wo.weight": (self.dim, q_out),
                p + "feed_forward.w1.weight": (self.hidden_dim, self.dim),
                p + "feed_forward.w2.weight": (self.dim, self.hidden_dim),
                p + "feed_forward.w3.weight": (self.hidden_dim, self.dim),
                p + "attention_norm.weight": (self.dim,),
                p + "ffn_norm.weight": (self.dim,),
            }
        if layout == "original":
            return shapes
        if layout == "hf":
            return {original_to_hf_name(k): v for k, v in shapes.items()}
        raise CatalogError(f"unknown layout {layout!r} (expected 'hf' or 'original')")

    @property
    def n_params(self) -> int:
        """Number of weights in the model."""
        total = 0
        for shape in self.tensor_shapes("original").values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total


_HF_LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def original_to_hf_name(name: str) -> str:
    """Map an original-layout tensor name to its HF-layout name."""
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    layer, _, rest = name.partition(".")  # "layers", "0.attention.wq.weight"
    index, _, rest = rest.partition(".")
    module, _, suffix = rest.rpartition(".")
    if layer != "layers" or module not in _HF_LAYER_NAMES:
        raise CatalogError(f"not a Mistral tensor name: {name!r}")
    return f"model.layers.{index}.{_HF_LAYER_NAMES[module]}.{suffix}"


def hf_to_original_name(name: str) -> str:
    """Map an HF-layout tensor name to its original-layout name."""
    for orig, hf in _HF_TOP_NAMES.items():
        if name == hf:
            return orig
    prefix = "model.layers."
    if name.startswith(prefix):
        index, _, rest = name[len(prefix):].partition(".")
        module, _, suffix = rest.rpartition(".")
        for orig, hf in _HF_LAYER_NAMES.items():
            if module == hf:
                return f"layers.{index}.{orig}.{suffix}"
    raise CatalogError(f"not a Mistral tensor name: {name!r}")


def permute_for_hf_rows(n_rows: int, n_heads: int) -> list[int]:
    """Row order that turns an original ``wq``/``wk`` into the HF layout's.

    The original rotary pairs dimensions (2i, 2i+1) of each head; HF's ``rotate_half`` pairs
    (i, i + head_dim/2). Within each head, HF row ``j`` is original row ``src[j]``; the result
    indexes rows: ``w_hf = w_orig[perm]``, and ``w_orig[perm] = w_hf`` undoes it.
    """
    head_dim = n_rows // n_heads
    assert head_dim * n_heads == n_rows and head_dim % 2 == 0, (n_rows, n_heads)
    half = head_dim // 2
    perm: list[int] = []
    for h in range(n_heads):
        base = h * head_dim
        # HF row (h, j) for j < half holds original row 2j; for j >= half, original row 2(j-half)+1
        perm += [base + 2 * j for j in range(half)] + [base + 2 * j + 1 for j in range(half)]
    return perm
