"""blob-serve: serve a blob model over OpenAI's HTTP API.

    blob-serve MODEL.blob                      (http://127.0.0.1:8080/v1)
    blob-serve                                 (the built-in demo model)
    blob-serve MODEL.blob --host 0.0.0.0 --api-key KEY --parallel 2
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from ...errors import FormatError
from .. import kernels
from ..api import load
from ..demo import demo_path

SHUTDOWN_GRACE_SECONDS = 5  # on SIGINT/SIGTERM, in-flight requests get this long to finish, then are cancelled


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blob-serve", description="Serve a model packed by blob-pack over OpenAI's HTTP API "
                                       "(/v1/chat/completions, /v1/completions, /v1/models, /health), "
                                       "for the openai client, editors, chat UIs and agents.")
    p.add_argument("model", nargs="?", default=None,
                   help="the .blob file (made with: blob-pack convert SRC -o MODEL.blob); without it, the built-in "
                        "demo model. Clients name the model by the file's stem (demo for the demo model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                        "network, so set --api-key too)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("--parallel", type=int, default=1,
                   help="requests generating at once (default 1), each in its own session (KV cache) of --ctx "
                        "tokens; a request reuses the session whose history shares the longest prefix with it")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait for a slot (default 8); past that the server answers 503 "
                        "with Retry-After")
    p.add_argument("--ctx", type=int, default=None,
                   help="context length in tokens, prompt and answer together (default: the model's, capped "
                        "to fit in RAM); a longer prompt is refused with 400")
    p.add_argument("--api-key", default=os.environ.get("BLOB_SERVE_API_KEY"),
                   help="require the header 'Authorization: Bearer KEY' on /v1 (default: the environment "
                        "variable BLOB_SERVE_API_KEY, else no key)")
    p.add_argument("-t", "--threads", type=int, default=None,
                   help=f"compute threads (default: physical performance cores, {kernels.physical_cores()} here)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn

        from .app import create_app
        from .engine import ModelEngine
        from .grammar import Grammars
    except ImportError as error:
        print(f"blob-serve: error: {error.name} is missing; install the server extra: "
              f"pip install 'blobstore-runtime[server]'", file=sys.stderr)
        return 1
    if args.parallel < 1 or args.queue < 0:
        print("blob-serve: error: --parallel must be >= 1 and --queue >= 0", file=sys.stderr)
        return 2
    try:
        model = load(args.model, threads=args.threads, max_seq_len=args.ctx, verbose=True)
    except (FormatError, OSError, ValueError) as error:
        print(f"blob-serve: error: {error}", file=sys.stderr)
        return 1
    model_id = Path(args.model or demo_path()).stem
    try:
        grammars = Grammars(model)
    except ValueError as error:
        print(f"blob-serve: response_format is off for this model: {error}", file=sys.stderr)
        grammars = None
    app = create_app(ModelEngine(model, sessions=args.parallel), model_id, api_key=args.api_key,
                     parallel=args.parallel, queue_size=args.queue, grammars=grammars)
    print(f"blob-serve: model {model_id!r} at http://{args.host}:{args.port}/v1", file=sys.stderr)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the previous
    # handler: these handlers turn that into a normal exit instead of a traceback or a kill
    signal.signal(signal.SIGTERM, _stop)
    try:
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
                    log_level="warning")
    except (_Stopped, KeyboardInterrupt):
        pass
    print("blob-serve: stopped", file=sys.stderr)
    return 0


class _Stopped(Exception):
    """SIGTERM, after uvicorn's graceful shutdown."""


def _stop(signum, frame):
    raise _Stopped()


if __name__ == "__main__":
    sys.exit(main())
