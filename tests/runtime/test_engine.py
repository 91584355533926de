"""Continuous batching: joins and leaves between steps, with per-request results unchanged."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import torch

from tests.runtime.conftest import hf_logprobs
from weightship.errors import EngineOverloadedError, EngineStoppedError, InvalidRequestError
from weightship.runtime.engine import Engine, EngineConfig
from weightship.runtime.model import Transformer
from weightship.runtime.request import Output
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.tokenizer import Tokenizer


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, 32000, (length - 1,), generator=g).tolist()]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


class Collector:
    """A sink that records every output, and the order requests finished in."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[Output]] = {}
        self.finished: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def sink(self, out: Output) -> None:
        with self.lock:
            self.outputs.setdefault(out.request_id, []).append(out)
            if out.finished:
                self.finished.append(out.request_id)
                self.done.notify_all()

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def wait(self, n: int, timeout: float = 60) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: len(self.finished) >= n, timeout), self.finished


def _run_until_idle(engine: Engine) -> None:
    while engine.step():
        pass


def test_new_prompts_that_fit_are_prefilled_in_one_pass(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts that arrive together and fit the step's budget (24 tokens here) share one
    forward pass; a longer one is prefilled in chunks beside them. All get their solo tokens."""
    specs = [(_prompt(n, seed=50 + n), 12) for n in (6, 11, 7, 40)]
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    packs: list[int] = []
    real = engine.model.prefill_packed

    def spy(prompts: list[torch.Tensor], *args: object, **kw: object) -> torch.Tensor:
        packs.append(len(prompts))
        return real(prompts, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.model, "prefill_packed", spy)
    col = Collector()
    ids = [engine.submit(p, greedy(n), col.sink) for p, n in specs]
    _run_until_idle(engine)
    assert [col.tokens(r) for r in ids] == solo
    assert packs[0] == 3  # 6 + 11 + 7 tokens in one pass; the 40-token prompt went in chunks


def test_eight_concurrent_requests_get_their_solo_tokens(engine: Engine) -> None:
    specs = [(_prompt(5 + 9 * i, seed=i), 6 + 5 * i) for i in range(8)]  # prompts 5..68 tokens
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    col = Collector()
    ids = [engine.submit(p, greedy(n), col.sink) for p, n in specs]
    _run_until_idle(engine)
    assert [col.tokens(r) for r in ids] == solo
    assert [len(t) for t in solo] == [n for _, n in specs]


def test_concurrent_requests_on_the_engine_thread(engine: Engine) -> None:
    specs = [(_prompt(40 - 4 * i, seed=10 + i), 20 + 3 * i) for i in range(8)]
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    col = Collector()
    engine.start()
    try:
        ids = [engine.submit(p, greedy(n), col.sink) for p, n in specs]
        col.wait(8)
    finally:
        engine.stop()
    assert [col.tokens(r) for r in ids] == solo


def test_a_short_request_arriving_during_a_long_one_finishes_first(engine: Engine) -> None:
    col = Collector()
    long_id = engine.submit(_prompt(30, 1), greedy(200), col.sink)
    for _ in range(5):
        engine.step()
    assert engine.stats().running == 1 and long_id not in col.finished
    short_id = engine.submit(_prompt(10, 2), greedy(5), col.sink)
    _run_until_idle(engine)
    assert col.finished == [short_id, long_id]
    assert len(col.tokens(long_id)) == 200


def test_cancelling_frees_the_slot_at_once(tiny_model: Transformer, tokenizer: Tokenizer) -> None:
    eng = Engine(tiny_model, tokenizer, EngineConfig(max_queue=4, max_batch=1))
    col = Collector()
    first = eng.submit(_prompt(10, 3), greedy(400), col.sink)
    second = eng.submit(_prompt(10, 4), greedy(3), col.sink)
    for _ in range(4):
        eng.step()
    assert eng.stats().running == 1 and eng.stats().waiting == 1
    eng.cancel(first)
    eng.step()  # the cancellation, the admission of the waiting request and its prefill
    assert col.finished[0] == first and col.outputs[first][-1].finish_reason == "cancelled"
    assert len(col.tokens(first)) < 400
    _run_until_idle(eng)
    assert col.finished == [first, second] and len(col.tokens(second)) == 3
    assert eng.stats().running == 0


def test_seeded_sampling_is_reproducible_in_any_batch(engine: Engine) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = _prompt(12, 5)
    alone = engine.generate(prompt, params).token_ids
    col = Collector()
    others = [engine.submit(_prompt(8 + i, 20 + i), SamplingParams(max_tokens=30, seed=i), col.sink)
              for i in range(3)]
    mine = engine.submit(prompt, params, col.sink)
    _run_until_idle(engine)
    assert col.tokens(mine) == alone
    other_seed = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95,
                                                        seed=4321, ignore_eos=True)).token_ids
    assert other_seed != alone
    assert len(others) == 3


def test_top_k_1_and_a_tiny_top_p_are_greedy(engine: Engine) -> None:
    prompt = _prompt(15, 6)
    want = engine.generate(prompt, greedy(16)).token_ids
    for params in (SamplingParams(max_tokens=16, temperature=1.0, top_k=1, ignore_eos=True),
                   SamplingParams(max_tokens=16, temperature=1.5, top_p=1e-6, ignore_eos=True)):
        assert engine.generate(prompt, params).token_ids == want


@contextlib.contextmanager
def _biased(model: Transformer, token: int, bias: float) -> Iterator[None]:
    """Add ``bias`` to one token's logit for the duration."""
    add = torch.zeros(model.args.arch.vocab_size)
    add[token] = bias
    original = model.output.forward
    model.output.forward = lambda x: original(x) + add  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.output.forward


def test_penalties_change_greedy_choices(engine: Engine) -> None:
    favourite = 1234
    prompt = _prompt(15, 7)
    with _biased(engine.model, favourite, 12.0):
        plain = engine.generate(prompt, greedy(32)).token_ids
        penalized = engine.generate(prompt, SamplingParams(
            max_tokens=32, temperature=0, ignore_eos=True, frequency_penalty=2.0,
            presence_penalty=2.0)).token_ids
    assert plain == [favourite] * 32
    assert 1 <= penalized.count(favourite) <= 6


def test_stop_strings_cut_the_text(engine: Engine, tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("Once upon a time", bos=True)
    full = engine.generate(prompt, greedy(40), context=prompt)
    assert len(full.text) > 20
    stop = full.text[10:14]
    cut = engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop, "zzzzqq")),
                          context=prompt)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_limits_are_typed_errors(engine: Engine) -> None:
    sink = Collector().sink
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.submit([], greedy(1), sink)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.submit([1, -1], greedy(1), sink)
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.submit([1, 32000], greedy(1), sink)
    with pytest.raises(InvalidRequestError, match="context length") as e:
        engine.submit(_prompt(500, 1), greedy(13), sink)
    assert e.value.code == "context_length_exceeded"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            SamplingParams(max_tokens=bad)  # type: ignore[arg-type]
    for _ in range(16):
        engine.submit(_prompt(5, 1), greedy(1), sink)
    with pytest.raises(EngineOverloadedError) as full:
        engine.submit(_prompt(5, 1), greedy(1), sink)
    assert full.value.retryable and full.value.retry_after >= 1
    engine.stop(drain=False)
    with pytest.raises(EngineStoppedError):
        engine.submit(_prompt(5, 1), greedy(1), sink)


def test_max_tokens_and_eos_finish_reasons(engine: Engine, tokenizer: Tokenizer) -> None:
    out = engine.generate(_prompt(9, 8), greedy(7))
    assert out.finish_reason == "length" and len(out.token_ids) == 7
    with _biased(engine.model, tokenizer.eos_id, 1e4):
        stopped = engine.generate(_prompt(9, 8), SamplingParams(max_tokens=7, temperature=0))
    assert stopped.finish_reason == "stop" and stopped.token_ids == [tokenizer.eos_id]
    assert stopped.text == ""


def _lookahead_engine(engine: Engine) -> tuple[Engine, list[int]]:
    """An engine over the same model that launches steps ahead, and a count of those launches."""
    ahead = Engine(engine.model, engine.tokenizer,
                   EngineConfig(prefill_chunk=24, max_queue=16, lookahead=True))
    launches = [0]
    launch_next = ahead.runner.launch_next

    def counted(greedy: torch.Tensor) -> tuple[list[int], tuple[torch.Tensor, torch.Tensor]]:
        launches[0] += 1
        return launch_next(greedy)

    ahead.runner.launch_next = counted  # type: ignore[method-assign]
    return ahead, launches


def test_launching_steps_ahead_changes_no_token(engine: Engine) -> None:
    """Requests joining and leaving a batch that runs ahead get their solo tokens."""
    ahead, launches = _lookahead_engine(engine)
    specs = [(_prompt(5 + 9 * i, seed=i), 40 - 4 * i) for i in range(6)]
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    col = Collector()
    ids = [ahead.submit(p, greedy(n), col.sink) for p, n in specs[:3]]
    for _ in range(12):
        ahead.step()
    ids += [ahead.submit(p, greedy(n), col.sink) for p, n in specs[3:]]
    _run_until_idle(ahead)
    assert [col.tokens(r) for r in ids] == solo
    assert launches[0] > 10  # the batch did run ahead, so the comparison means something


def test_a_stop_while_running_ahead_leaves_the_slot_clean(engine: Engine) -> None:
    """A request that stops on a stop string discards the step launched ahead of it; the next
    request in its slot is unaffected."""
    ahead, launches = _lookahead_engine(engine)
    first, second = _prompt(12, 21), _prompt(17, 22)
    text = engine.generate(first, greedy(40)).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    expected = engine.generate(first, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                     stop=(stop,)))
    assert expected.finish_reason == "stop" and len(expected.token_ids) < 40
    stopped = ahead.generate(first, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                   stop=(stop,)))
    assert (stopped.token_ids, stopped.text, stopped.finish_reason) == (
        expected.token_ids, expected.text, "stop")
    assert launches[0] > 0
    assert ahead.generate(second, greedy(30)).token_ids == engine.generate(second, greedy(30)).token_ids


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """torch.compile's caches emptied: every runner's step compiles from scratch, and the
    8-entry limit per code object (which silently runs eagerly past it) is not reached."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.compiles
@pytest.mark.usefixtures("fresh_dynamo")
def test_the_compiled_decode_step_gives_the_eager_tokens(tiny_model: Transformer, engine: Engine,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """The decode step CUDA runs, torch.compile'd whole (here by inductor's CPU backend), joins and
    leaves a batch past the sliding window with every request's eager tokens."""
    compiled = Engine(tiny_model, None, EngineConfig(prefill_chunk=24, use_graphs=False, compile_step=True))
    specs = [(_prompt(5, seed=31), 60), (_prompt(40, seed=32), 20), (_prompt(90, seed=33), 45)]
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    col = Collector()
    ids = [compiled.submit(p, greedy(n), col.sink) for p, n in specs[:2]]
    for _ in range(8):
        compiled.step()
    ids.append(compiled.submit(specs[2][0], greedy(specs[2][1]), col.sink))
    _run_until_idle(compiled)
    assert [col.tokens(r) for r in ids] == solo
    assert compiled.runner._compiled is not None, caplog.text  # it did not fall back to eager
    assert _graphs_compiled() >= 2  # batch 1, and batches of 2 and more


@pytest.mark.compiles
@pytest.mark.usefixtures("fresh_dynamo")
def test_warm_up_compiles_every_decode_shape_before_the_first_request(tiny_model: Transformer,
                                                                      engine: Engine) -> None:
    """What ``serve`` does before /ready: afterwards no batch waits for a compilation, and the
    cache holds no trace of the warm-up steps."""
    compiled = Engine(tiny_model, None, EngineConfig(prefill_chunk=24, use_graphs=False, compile_step=True))
    before = _graphs_compiled()
    compiled.warm_up()
    warmed = _graphs_compiled()
    assert warmed >= before + 2 and compiled.runner._compiled is not None
    assert (compiled.cache.pos == -1).all()
    specs = [(_prompt(6 + 7 * i, seed=60 + i), 10 + 3 * i) for i in range(5)]
    solo = [engine.generate(p, greedy(n)).token_ids for p, n in specs]
    col = Collector()
    ids = [compiled.submit(p, greedy(n), col.sink) for p, n in specs]
    _run_until_idle(compiled)
    assert [col.tokens(r) for r in ids] == solo  # batches of 5 down to 1 ran
    assert _graphs_compiled() == warmed


def test_logprobs_in_a_mixed_batch_are_each_rows_own(engine: Engine, hf_model: torch.nn.Module) -> None:
    """Rows that want log-probabilities (greedy, and sampled: the model's own, before the
    temperature) share decode steps with a row that does not; each gets its own tokens'. The
    first two prompts (9 + 14 tokens of a 24-token budget) are prefilled packed together, only
    the first scoring its prompt (echo); the third goes in chunks."""
    specs = [(_prompt(9, seed=41), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2,
                                                  prompt_logprobs=1)),
             (_prompt(14, seed=43), SamplingParams(max_tokens=25, temperature=0.8, seed=5, ignore_eos=True,
                                                   logprobs=0)),
             (_prompt(30, seed=42), greedy(22))]
    col = Collector()
    ids = [engine.submit(p, params, col.sink) for p, params in specs]
    _run_until_idle(engine)
    for rid, (prompt, params) in zip(ids, specs, strict=True):
        tokens = col.tokens(rid)
        entries = [e for o in col.outputs[rid] for e in o.logprobs or ()]
        if params.logprobs is None:
            assert entries == []
            continue
        ref = hf_logprobs(hf_model, prompt + tokens)
        assert [e.token for e in entries] == tokens
        if params.prompt_logprobs is not None:
            scored = col.outputs[rid][0].prompt_logprobs
            assert scored is not None and [e.token for e in scored] == prompt and scored[0].logprob is None
            assert all(abs(e.logprob - ref[p - 1, e.token].item()) < 1e-4  # type: ignore[operator]
                       for p, e in enumerate(scored) if p)
        assert all(len(e.top) == params.logprobs for e in entries)
        for i, e in enumerate(entries):
            assert e.logprob is not None and abs(e.logprob - ref[len(prompt) - 1 + i, e.token].item()) < 1e-4


def test_a_chats_next_turn_prefills_only_what_is_new(engine: Engine, tiny_model: Transformer,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt that starts with a finished sequence's tokens (the next turn of a chat) goes to
    that sequence's slot and prefills only the rest, while another request decodes beside it
    (its slot an idle row meanwhile); a prompt that differs early, or follows a sequence that
    outgrew the rolling buffer, starts afresh. Every answer is the one a fresh engine gives."""
    calls: list[tuple[int, int]] = []  # (start, tokens) of each prefill
    real_packed, real_chunk = engine.model.prefill_packed, engine.model.prefill

    def packed(prompts: list[torch.Tensor], *args: object, **kw: object) -> torch.Tensor:
        calls.extend((0, len(p)) for p in prompts)
        return real_packed(prompts, *args, **kw)  # type: ignore[arg-type]

    def chunk(tokens: torch.Tensor, start: int, *args: object, **kw: object) -> torch.Tensor:
        calls.append((start, len(tokens)))
        return real_chunk(tokens, start, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine.model, "prefill_packed", packed)
    monkeypatch.setattr(engine.model, "prefill", chunk)
    fresh = Engine(tiny_model, None, EngineConfig(prefill_chunk=24))

    col = Collector()
    first = _prompt(10, seed=70)
    a = engine.submit(first, greedy(8), col.sink)
    engine.submit(_prompt(7, seed=71), greedy(40), col.sink)  # keeps decoding in the next slot
    while a not in col.finished:
        engine.step()
    for _ in range(3):  # decode steps with a's slot an idle row
        engine.step()
    turn = first + col.tokens(a) + _prompt(5, seed=72)[1:]  # 22 tokens; the slot holds 10 + 7
    calls.clear()
    b = engine.submit(turn, greedy(6), col.sink)
    while b not in col.finished:
        engine.step()
    assert calls == [(17, 5)]
    assert col.tokens(b) == fresh.generate(turn, greedy(6)).token_ids

    other = turn[:5] + [(t + 1) % 32000 for t in turn[5:]]  # the same first 5 tokens only
    calls.clear()
    assert engine.generate(other, greedy(4)).token_ids == fresh.generate(other, greedy(4)).token_ids
    assert calls[0] == (0, len(other))

    _run_until_idle(engine)
    long = engine.generate(_prompt(20, seed=73), greedy(20))  # 39 tokens fed: past the 32 entries
    again = _prompt(20, seed=73) + long.token_ids[:3]
    calls.clear()
    assert engine.generate(again, greedy(4)).token_ids == fresh.generate(again, greedy(4)).token_ids
    assert calls[0] == (0, len(again))
