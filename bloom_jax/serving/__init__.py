"""Serving: an OpenAI-compatible HTTP server (`bloom-jax serve`) over a continuous-batching engine.

- `batch`: the compiled device work (prefill, slot insertion, decode steps with per-row sampling).
- `engine`: the engine thread, its bounded queue and the requests it runs.
- `protocol`: OpenAI's request fields, checked, and its response bodies.
- `app`: the Starlette application and `serve`, which runs it under uvicorn.
"""
