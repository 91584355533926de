"""What the server's routes share: the engine once loaded, the limits, readiness, metrics."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field

from weightship.runtime.engine import Engine
from weightship.runtime.keys import KeyRing
from weightship.runtime.metrics import Metrics
from weightship.runtime.middleware import Limits
from weightship.runtime.sampling import SamplingParams
from weightship.runtime.tokenizer import Tokenizer
from weightship.runtime.usage import UsageLog

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share: the engine once loaded, readiness, draining, metrics."""

    model_name: str
    api_keys: frozenset[str] = frozenset()
    keyring: KeyRing | None = None  # wins over api_keys: a key file, reloaded when it changes
    usage_log: UsageLog | None = None  # one record per finished API request (runtime/usage.py)
    limits: Limits = field(default_factory=Limits)
    max_choices: int = 16  # n × prompts per request; more is refused as absurd
    # Log-probabilities one response may hold: choices × scored tokens × (1 + alternatives),
    # counted from what the request asks (echo, max_tokens, n). More is refused (400). This
    # leaves room for lm-evaluation-harness's scoring requests (echo, logprobs=1, max_tokens=1)
    # of 16 prompts of 4,095 tokens, about 4 MB of JSON, but not for an 11 KB request (echo,
    # logprobs=20, n=16, 2,041 prompt tokens) asking for 686,112 of them, 19 MB. A chat request
    # that asks for log-probabilities without max_tokens gets a default that fits (its
    # finish_reason says "length" if it runs out).
    max_logprobs: int = 1 << 17
    engine: Engine | None = None
    tokenizer: Tokenizer | None = None
    ready: bool = False
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # UTF-8 bytes of prompt text that can fit in the context at all (the context length × the
    # bytes one token stands for, at most): a longer text is refused before it is tokenized.
    max_prompt_bytes: int = 0

    def __post_init__(self) -> None:
        self.metrics = Metrics(lambda: self.engine.stats() if self.engine else None)

    def attach(self, engine: Engine, tokenizer: Tokenizer) -> None:
        """Warm ``engine`` (every decode shape, then one short request), start it, turn ready."""
        self.max_prompt_bytes = engine.args.max_model_len * tokenizer.max_token_bytes
        self.engine, self.tokenizer = engine, tokenizer
        engine.warm_up()
        engine.start()
        engine.generate([tokenizer.bos_id], SamplingParams(max_tokens=2, temperature=0))
        # The hundreds of thousands of objects of the libraries and the model live as long as the
        # process: out of the collector's sight, so that a full collection (which the many small
        # objects of a large response set off) does not walk them all holding the GIL (0.37 s
        # of stalled event loop, measured on the tiny model).
        gc.collect()
        gc.freeze()
        self.ready = True
        log.info("engine warm; serving %s", self.model_name)
