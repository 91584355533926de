"""The Mistral runtime: model, KV cache, continuous-batching engine, tokenizer, server.

The model, cache, engine and tokenizer modules import only torch (and sentencepiece), so they
run wherever PyTorch does; :mod:`weightship.runtime.server` adds FastAPI and uvicorn.
"""
