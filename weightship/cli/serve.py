"""``weightship serve``: an OpenAI-compatible server for a verified model directory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from weightship.errors import UsageError


def resolve_model_dir(model: str) -> Path:
    """A directory as given, or a catalog name's default directory ($WEIGHTSHIP_HOME/models/NAME)."""
    path = Path(model)
    if path.is_dir():
        return path
    from weightship.catalog import is_catalog_name
    from weightship.settings import get_settings

    if is_catalog_name(model):
        directory = get_settings().model_dir(model)
        if directory.is_dir():
            return directory
        raise UsageError(f"{model} has not been fetched to {directory}",
                         hint=f"run `weightship fetch {model}` first, or give a directory")
    raise UsageError(f"{model} is neither a directory nor a catalog model")


# Long only by its options, which typer reads from the signature; the body parses and calls the library.
def serve(
    model: Annotated[str, typer.Argument(help="Model directory, or a fetched catalog model's name.",
                                         metavar="DIR|MODEL")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1, cpu (default: cuda if "
                                               "available).")] = None,
    dtype: Annotated[str | None, typer.Option(help="bfloat16, float16 or float32 (default: "
                                              "bfloat16 on CUDA, float32 on CPU).")] = None,
    max_batch: Annotated[int, typer.Option(help="Sequences decoded together (KV-cache slots).")] = 8,
    max_model_len: Annotated[int | None, typer.Option(help="Longest prompt + completion, in "
                                                      "tokens (default: the model's).")] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a slot; more get "
                                           "429.")] = 64,
    max_logprobs: Annotated[int, typer.Option(help="Log-probabilities one response may hold "
                                              "(choices × scored tokens × (1 + alternatives)); a "
                                              "request asking for more gets 400.")] = 1 << 17,
    api_key_file: Annotated[Path | None, typer.Option(help="API keys: one per line, or the "
                                                      "hashed key file of `weightship instance "
                                                      "keys`; then every route but /health and "
                                                      "/ready needs 'Authorization: Bearer KEY'. "
                                                      "Re-read when it changes.")] = None,
    usage_log: Annotated[Path | None, typer.Option(help="Append one JSON record per finished API "
                                                   "request (key id, tokens, status) to this "
                                                   "file; GET /v1/usage returns the records of "
                                                   "every *.jsonl beside it.")] = None,
    served_name: Annotated[str | None, typer.Option("--name", help="Model id in the API "
                                                    "(default: the directory's name).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Serve even if the manifest is "
                                            "missing or does not verify.")] = False,
    compile_step: Annotated[bool | None, typer.Option(
        "--compile/--no-compile", help="torch.compile the decode step before turning ready: "
        "faster tokens for a minute or two more start-up, and a C++ compiler on CPU (default: "
        "on CUDA).")] = None,
    compile_cache: Annotated[Path | None, typer.Option(
        help="Keep what torch.compile makes (on CUDA, or with --compile) here and reuse it at "
        "the next start with the same device, dtype, shapes and versions (default: "
        "DIR/.weightship/compile-cache when the model directory is writable, else none).",
        metavar="CACHE_DIR")] = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API until SIGTERM (which drains).

    The directory must verify against its manifest first (exit 3 if not), unless --no-verify.
    /health answers at once; /ready once the weights are loaded and the engine is warm.
    A prompt text longer than the context could hold (the context length in tokens × the most
    bytes one token stands for) is refused before it is tokenized; OpenAI parameters the server
    does not implement (response_format, tools, tool_choice, …) are refused with 400 naming them.

    Examples:

    \b
      weightship serve ./tiny --port 8000
      weightship serve mistral-7b-v0.1 --host 0.0.0.0 --max-batch 32 --api-key-file keys.txt
      weightship serve ./tiny --device cpu --max-model-len 1024
      weightship serve /srv/models/m --compile-cache /var/cache/weightship/m/compile
    """
    from weightship.runtime import launch

    # The start-up summary (how long it took, what the compile cache held) is shown without -v.
    launch.log.setLevel(min(launch.log.getEffectiveLevel(), logging.INFO))
    options = launch.ServeOptions(
        host=host, port=port, name=served_name, verify=not no_verify, device=device, dtype=dtype,
        max_batch=max_batch, max_model_len=max_model_len, max_queue=max_queue,
        max_logprobs=max_logprobs, api_key_file=api_key_file, usage_log=usage_log,
        compile_step=compile_step, compile_cache=compile_cache)
    launch.serve_directory(resolve_model_dir(model), options)


if __name__ == "__main__":  # `python -m weightship.cli.serve`, for tests and debugging
    import sys

    from weightship.cli import _common

    cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    cli.command()(serve)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(_common.run(cli))
