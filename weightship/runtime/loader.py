"""Load a model directory of either layout into a :class:`Transformer`, safetensors only.

Mistral and Llama models (``config.json``'s ``model_type``) load the same way; a Llama's tied
embeddings become one tensor that the output projection shares.

Steps:
1. read the architecture from ``config.json`` (HF layout) or ``params.json`` (original);
2. list the weight files: ``model.safetensors.index.json``'s shards, ``model*.safetensors``,
   or ``consolidated*.safetensors`` (made by ``weightship convert``) — a directory with only
   pickles (``.pth``/``.bin``) is refused, never unpickled;
3. validate each file's header, rename HF tensors to the original names, check every name and
   shape against the architecture (:mod:`weightship.runtime.weights`);
4. copy each tensor once into its final place on the device, converting its dtype and undoing
   the HF rotary row permutation of ``wq``/``wk`` on the way (on the CPU, a tensor that needs
   neither stays a view of the memory-mapped file);
5. build the model on the ``meta`` device and ``load_state_dict(assign=True, strict=True)``:
   the parameters are the loaded tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from weightship.catalog.architecture import Architecture
from weightship.errors import CatalogError, MalformedWeightsError, UsageError
from weightship.runtime.args import ModelArgs
from weightship.runtime.model import Transformer
from weightship.runtime.weights import load_weights

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelFiles:
    """Where a model directory keeps its parts."""

    directory: Path
    layout: str  # "hf" or "original"
    arch: Architecture
    weights: tuple[Path, ...]
    tokenizer: Path


def pick_device(device: str | None) -> torch.device:
    """``device``, or CUDA when available, else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``dtype`` by name, or bfloat16 on CUDA and float32 on CPU."""
    if dtype:
        if dtype not in DTYPES:
            raise UsageError(f"unknown dtype {dtype!r}", hint="use one of: " + ", ".join(DTYPES))
        return DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def find_files(directory: Path) -> ModelFiles:
    """Work out the layout, architecture, weight files and tokenizer of a model directory."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")
    # SentencePiece where there is one (Mistral's HF repos carry both), else tokenizer.json
    tokenizer = next((directory / n for n in ("tokenizer.model", "tokenizer.json") if (directory / n).is_file()),
                     None)
    if tokenizer is None:
        raise CatalogError(f"{directory}: no tokenizer.model or tokenizer.json")
    if (directory / "config.json").is_file():
        layout = "hf"
        arch = Architecture.from_hf_config(_read_json(directory / "config.json"))
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CatalogError(f"{index}: no weight_map")
            weights = tuple(directory / f for f in sorted(set(weight_map.values())))
        else:
            weights = tuple(sorted(directory.glob("model*.safetensors")))
    elif (directory / "params.json").is_file():
        layout = "original"
        arch = Architecture.from_mapping(_read_json(directory / "params.json"))
        weights = tuple(sorted(directory.glob("consolidated*.safetensors")))
    else:
        raise CatalogError(f"{directory}: neither config.json nor params.json found")
    if not weights:
        hint = ("run `weightship convert DIR --to safetensors` first" if layout == "original"
                else "the runtime loads safetensors only")
        raise CatalogError(f"{directory}: no safetensors weights", hint=hint)
    for path in weights:
        if not path.is_file() or path.is_symlink() or path.parent != directory:
            raise MalformedWeightsError(str(path), "missing, or not a plain file of the directory")
    return ModelFiles(directory, layout, arch, weights, tokenizer)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CatalogError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: not a JSON object")
    return data


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], *,
                compile_pointwise: bool | None = None) -> Transformer:
    """A :class:`Transformer` built on ``meta`` whose parameters are ``state``'s tensors.

    ``state`` is emptied, so that fusing the projections does not hold two copies of them.
    """
    with torch.device("meta"):
        model = Transformer(args)
    if args.arch.tie_embeddings:  # one tensor under both names: the output reads the embedding
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    state.clear()
    model.requires_grad_(False)
    model.init_rotary()
    model.fuse(compile_pointwise)
    return model.eval()


def load_model(directory: Path, *, device: str | None = None, dtype: str | None = None,
               max_batch: int = 8, max_model_len: int | None = None) -> tuple[Transformer, ModelFiles]:
    """Load ``directory`` onto ``device`` in ``dtype`` (defaults: CUDA/bf16, else CPU/fp32)."""
    files = find_files(directory)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    length = min(max_model_len or files.arch.max_seq_len, files.arch.max_seq_len)
    args = ModelArgs(files.arch, max_batch=max_batch, max_model_len=length)
    model = build_model(args, load_weights(files.weights, files.layout, files.arch, dt, dev))
    log.info("loaded %s (%s layout, %d parameters) on %s as %s", directory, files.layout,
             files.arch.n_params, dev, dt)
    return model, files
