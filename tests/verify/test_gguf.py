"""``weightship convert FILE.gguf --to DIR`` on tiny Llama GGUFs written by llama.cpp's own writer:
the weights transformers reads from the same GGUF, in every tensor type convert supports; the same
bytes twice; a manifest that names the GGUF; hostile files refused at once with nothing written."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_clean_failure, run_cli
from tests.verify.gguf_files import (
    patch_array_length,
    patch_tensor,
    tensor_offset,
    write_tiny_llama,
)
from weightship.errors import MalformedGgufError, UnsupportedGgufError
from weightship.manifest import Manifest
from weightship.verify.gguf_convert import convert_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _transformers_state(gguf: Path) -> dict[str, torch.Tensor]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                              dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not tied}


def _ours(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("tied", [True, False])
def test_weights_are_what_transformers_reads_from_the_gguf(tmp_path: Path, tied: bool) -> None:
    """Every tensor type (F32, F16, BF16, Q8_0, Q4_0, Q4_1) dequantized as transformers does it,
    q/k rows in the HF order, an output matrix only when the GGUF has one."""
    gguf = write_tiny_llama(tmp_path / "m.gguf", tied=tied, seed=3)
    convert_gguf(gguf, tmp_path / "out", dtype="float32")
    theirs, ours = _transformers_state(gguf), _ours(tmp_path / "out")
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and config["model_type"] == "llama"
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5


def test_default_dtype_is_bf16_rounded_as_torch_rounds(tiny_gguf: Path, tmp_path: Path) -> None:
    convert_gguf(tiny_gguf, tmp_path / "bf16")
    convert_gguf(tiny_gguf, tmp_path / "f32", dtype="float32")
    bf16, f32 = _ours(tmp_path / "bf16"), _ours(tmp_path / "f32")
    for name, t in f32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name


def test_converting_twice_gives_the_same_bytes(tiny_gguf: Path, tmp_path: Path) -> None:
    r = run_cli("convert", tiny_gguf, "--to", tmp_path / "a", "--json")
    assert r.code == 0, r.stderr
    convert_gguf(tiny_gguf, tmp_path / "b")
    a, b = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [f.path for f in a.files] == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    for f in a.files:
        assert (tmp_path / "a" / f.path).read_bytes() == (tmp_path / "b" / f.path).read_bytes(), f.path
    assert a.files == b.files
    out = json.loads(r.stdout)
    assert out["source_sha256"] == a.source.revision == __import__("hashlib").sha256(tiny_gguf.read_bytes()).hexdigest()
    assert a.source.kind == "convert" and all(f.anchor == "convert" and a.source.revision in (f.source or "")
                                              for f in a.files)
    assert not (tmp_path / "a" / ".weightship" / "incoming").exists()


def test_the_result_verifies_deep_and_keeps_the_chat_template(tiny_gguf: Path, tmp_path: Path) -> None:
    from tests.verify.gguf_files import CHATML

    convert_gguf(tiny_gguf, tmp_path / "m")
    r = run_cli("verify", tmp_path / "m", "--deep")
    assert r.code == 0, r.stdout + r.stderr
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)


def test_tokenizer_json_encodes_as_transformers_reads_the_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    import transformers
    from tokenizers import Tokenizer

    convert_gguf(tiny_gguf, tmp_path / "m")
    ours = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in ["the answer in the end", "  héllo\twörld 😀\n\n", "<|im_start|>user\nhi<|im_end|>", "x" * 50]:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=False).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text


# ---- hostile files -------------------------------------------------------------------------------

def _hostile(data: bytes, kind: str) -> bytes:
    if kind == "truncated header":
        return data[:200]
    if kind == "truncated data":
        return data[:-100]
    if kind == "offset past the end":
        return patch_tensor(data, "blk.1.ffn_down.weight", offset=len(data))
    if kind == "overlapping tensors":
        return patch_tensor(data, "blk.1.ffn_down.weight", offset=tensor_offset(data, "blk.1.ffn_up.weight"))
    if kind == "absurd dimensions":
        return patch_tensor(data, "token_embd.weight", dims=[1 << 40, 1 << 40])
    if kind == "unknown quant type":
        return patch_tensor(data, "blk.0.attn_q.weight", type_id=99)
    if kind == "huge metadata array":
        return patch_array_length(data, "tokenizer.ggml.merges", 1 << 62)
    if kind == "huge string array":
        return patch_array_length(data, "tokenizer.ggml.tokens", 1 << 21)
    if kind == "not a GGUF":
        return b"PK\x03\x04" + data[4:]
    raise AssertionError(kind)


HOSTILE = ["truncated header", "truncated data", "offset past the end", "overlapping tensors",
           "absurd dimensions", "unknown quant type", "huge metadata array", "huge string array", "not a GGUF"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_gguf_is_refused_at_once_with_nothing_written(tiny_gguf: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_hostile(tiny_gguf.read_bytes(), kind))
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises((MalformedGgufError, UnsupportedGgufError)) as caught:
        convert_gguf(bad, out)
    assert time.monotonic() - start < 1.0, kind
    assert not out.exists()
    assert str(bad) in str(caught.value)
    r = run_cli("convert", bad, "--to", out)
    assert_clean_failure(r, 1 if kind == "unknown quant type" else 3)
    assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # one line, and a hint
    assert not out.exists()


def test_a_model_other_than_llama_is_refused_by_name(tmp_path: Path) -> None:
    gguf = write_tiny_llama(tmp_path / "moe.gguf", extra_kv={"llama.expert_count": 8})
    with pytest.raises(UnsupportedGgufError, match="experts"):
        convert_gguf(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()
