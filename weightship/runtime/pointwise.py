"""The elementwise parts of a block (RMSNorm, residual adds, rotary, SwiGLU's gate), fusable.

At batch 1 a decode step is bound by reading the weights, and every extra kernel launch between
two matrix-vector products is time the memory bus sits idle. Eagerly, RMSNorm is about seven
kernels and rotary about eight; compiled, each is one. :class:`Pointwise` holds the functions
the layers call, shared by every layer of a model; :meth:`Pointwise.compile` swaps in compiled
versions that fall back to the eager ones if compilation fails (no Triton, no C compiler).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from weightship.runtime import compile_cache
from weightship.runtime.rope import apply_rotary

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Zhang & Sennrich, 2019) computed in float32, as transformers does."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.type_as(x)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual sum ``x + delta`` and its RMSNorm: one kernel where compiled."""
    h = x + delta
    return h, rms_norm(h, weight, eps)


def swiglu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: SwiGLU's gating (Shazeer, 2020)."""
    return F.silu(gate) * up


class _WithFallback:
    """A compiled function that reverts to ``eager`` for good if it ever fails to compile."""

    def __init__(self, eager: Callable[..., Any]) -> None:
        self.eager = eager
        self.compiled: Callable[..., Any] | None = torch.compile(eager, fullgraph=True, dynamic=True)

    def __call__(self, *args: Any) -> Any:
        # Inside a compiled decode step (decoding.py) the eager function is traced into the
        # step's own graph, to be fused with its neighbours there.
        if self.compiled is not None and not torch.compiler.is_compiling():
            try:
                return self.compiled(*args)
            except Exception as e:  # compilation problems surface at the first call
                if compile_cache.recover_from(e):  # a cache left by an earlier start: emptied
                    self.compiled = torch.compile(self.eager, fullgraph=True, dynamic=True)
                    return self(*args)
                log.warning("torch.compile of %s failed, running it eagerly: %s",
                            self.eager.__name__, str(e).splitlines()[0] if str(e) else type(e))
                self.compiled = None
        return self.eager(*args)


class Pointwise:
    """The elementwise functions one model's layers call."""

    def __init__(self) -> None:
        self.rms_norm: Callable[..., torch.Tensor] = rms_norm
        self.add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
        self.rotary: Callable[..., torch.Tensor] = apply_rotary
        self.swiglu_gate: Callable[..., torch.Tensor] = swiglu_gate
        self.compiled = False

    def compile(self) -> None:
        """Fuse each function into one kernel with torch.compile (worth it on GPUs)."""
        self.rms_norm = _WithFallback(rms_norm)
        self.add_rms_norm = _WithFallback(add_rms_norm)
        self.rotary = _WithFallback(apply_rotary)
        self.swiglu_gate = _WithFallback(swiglu_gate)
        self.compiled = True

    def eager(self) -> None:
        """Back to the eager functions."""
        self.__init__()  # type: ignore[misc]
