"""blob-serve: an OpenAI-compatible HTTP server for blob models (the `server` extra: Starlette,
uvicorn, llguidance).

protocol.py — OpenAI's request checks, response and chunk shapes, error JSON
engine.py   — what runs a request: the model adapter, slots and the bounded queue, worker threads
grammar.py  — structured output (response_format) as an llguidance token mask
app.py      — the Starlette routes, auth, body limits, SSE
cli.py      — the blob-serve command

>>> from blobstore.runtime.serve import main
>>> main(["model.blob", "--port", "8080"])     # doctest: +SKIP
"""
from .cli import build_parser, main

__all__ = ["main", "build_parser"]
