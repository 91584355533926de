"""A real model end to end: SmolLM2-135M-Instruct (Llama: tied embeddings, 9 query heads over 3 KV
heads, rope theta 100000, byte-level BPE, ChatML) fetched through its catalog card, against
transformers loading the same GGUF in float32; served and asked a question through the official
openai client."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_cli
from tests.net import free_port
from tests.runtime.serving import serving
from tests.runtime.smollm2 import GGUF
from weightship.manifest import Manifest
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.model import Transformer
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.tokenizer import Tokenizer

TOL = 1e-4
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
        "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
        "to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed "
        "as the centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the "
        "French Revolution. Although initially criticised by some of France's leading artists and "
        "intellectuals for its design, it has since become a global cultural icon of France.")
QUESTION = "What is the capital of France?"


def _prompt(tokenizer: Tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    assert len(ids) >= n, len(ids)
    return ids[:n]


def _hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens from transformers, never stopping early (no end-of-turn rule)."""
    out: list[int] = []
    with torch.inference_mode():
        step = hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            token = int(step.logits[0, -1].argmax())
            out.append(token)
            step = hf(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def test_the_card_fetches_a_converted_verified_directory(smollm2_dir: Path) -> None:
    manifest = Manifest.load(smollm2_dir)
    assert manifest.source is not None and manifest.source.kind == "pypi"
    assert manifest.source.revision == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    by_path = {f.path: f for f in manifest.files}
    assert by_path[GGUF].anchor == "catalog"
    assert {p for p, f in by_path.items() if f.anchor == "convert"} == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    r = run_cli("verify", smollm2_dir, "--deep")
    assert r.code == 0, r.stdout + r.stderr


def test_converting_the_real_gguf_again_gives_the_same_bytes(smollm2_dir: Path, tmp_path: Path) -> None:
    r = run_cli("convert", smollm2_dir / GGUF, "--to", tmp_path / "again", timeout=300)
    assert r.code == 0, r.stderr
    fetched = {f.path: f.sha256 for f in Manifest.load(smollm2_dir).files if f.anchor == "convert"}
    for path, sha in fetched.items():
        assert hashlib.sha256((tmp_path / "again" / path).read_bytes()).hexdigest() == sha, path


def test_logits_match_transformers_on_a_100_token_prompt(smollm2_model: Transformer, smollm2_hf: Any,
                                                         smollm2_tokenizer: Tokenizer) -> None:
    tokens = torch.tensor([_prompt(smollm2_tokenizer, 100)])
    ours = smollm2_model(tokens)
    with torch.inference_mode():
        theirs = smollm2_hf(tokens).logits.float()
    assert ours.shape == theirs.shape == (1, 100, 49152)
    assert (ours - theirs).abs().max().item() < TOL


def test_64_greedy_tokens_match_transformers(smollm2_model: Transformer, smollm2_hf: Any,
                                             smollm2_tokenizer: Tokenizer) -> None:
    prompt = _prompt(smollm2_tokenizer, 40)
    engine = Engine(smollm2_model, smollm2_tokenizer, EngineConfig(prefill_chunk=16))  # prefill in chunks
    ours = engine.generate(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    assert ours.token_ids == _hf_greedy(smollm2_hf, prompt, 64)


def test_chat_through_the_server_matches_transformers(smollm2_f32_dir: Path, smollm2_hf: Any,
                                                      smollm2_hf_tokenizer: Any) -> None:
    """The model's own template, rendered by the server, gives transformers' prompt tokens; the
    64 greedy tokens that follow are the same text."""
    import openai

    messages = [{"role": "system", "content": "You are a concise geography tutor."},
                {"role": "user", "content": "Name three rivers of Europe."},
                {"role": "assistant", "content": "The Danube, the Rhine and the Seine."},
                {"role": "user", "content": "Which one flows through Paris?"}]
    prompt = smollm2_hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    want = smollm2_hf_tokenizer.decode(_hf_greedy(smollm2_hf, prompt, 64), skip_special_tokens=True)
    port = free_port()
    with serving(smollm2_f32_dir, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,  # type: ignore[arg-type]
                                               max_tokens=64, temperature=0, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == 64
    assert reply.choices[0].message.content == want


def test_the_served_model_answers_paris(smollm2_dir: Path) -> None:
    """The directory a user fetched (bf16 weights), served, asked through the openai client."""
    import openai

    port = free_port()
    with serving(smollm2_dir, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=48,
                                               messages=[{"role": "user", "content": QUESTION}])
        stream = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=48,
                                                messages=[{"role": "user", "content": QUESTION}], stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    answer = reply.choices[0].message.content or ""
    assert "Paris" in answer, answer
    assert reply.choices[0].finish_reason == "stop"  # ended on its <|im_end|>, which is not text
    assert "<|im_end|>" not in answer and streamed == answer


@pytest.mark.parametrize("n", [1, 3])
def test_batched_decoding_matches_one_at_a_time(smollm2_model: Transformer, smollm2_tokenizer: Tokenizer,
                                                n: int) -> None:
    prompts = [_prompt(smollm2_tokenizer, 20 + 7 * i) for i in range(n)]
    engine = Engine(smollm2_model, smollm2_tokenizer, EngineConfig(prefill_chunk=512))
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    alone = [engine.generate(p, params).token_ids for p in prompts]
    results: dict[str, list[int]] = {}
    ids = [engine.submit(p, params, lambda out: results.setdefault(out.request_id, []).extend(out.token_ids))
           for p in prompts]
    while engine.step():
        pass
    assert [results[i] for i in ids] == alone
