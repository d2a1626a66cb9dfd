"""The HTTP layer: Starlette routes for OpenAI's API, bearer-key auth, body limits, SSE streaming.
It knows the engine only through ModelEngine's public methods and properties (see engine.py)."""
from __future__ import annotations

import contextlib
import hmac
import json
import time
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Admission, Generation
from .grammar import Grammars
from ..tool_calls import ToolCallFormat
from .protocol import APIError, Job, Reply, parse_chat, parse_completion, usage

MAX_BODY_BYTES = 4 << 20   # a request body larger than this is refused with 413
DISCONNECT_POLL_SECONDS = 0.25  # how often a non-streamed request checks that its client is still there
_FORM_TYPES = ("multipart/form-data",)  # bodies that are never JSON


def create_app(engine, model_id: str, *, api_key: Optional[str] = None, parallel: int = 1, queue_size: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES, grammars: Optional[Grammars] = None) -> Starlette:
    """The ASGI app serving `engine` as model `model_id` (run it with uvicorn).

    >>> app = create_app(ModelEngine(load("gemma.blob")), "gemma")   # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)                # doctest: +SKIP
    """
    server = _Server(engine, model_id, api_key, max_body_bytes, grammars)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.admission = Admission(parallel, queue_size)  # its semaphore belongs to the serving loop
        yield

    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)


class _Server:
    def __init__(self, engine, model_id, api_key, max_body_bytes, grammars):
        self.engine, self.model_id, self.max_body_bytes = engine, model_id, max_body_bytes
        self.api_key = api_key.encode() if api_key else None
        self.grammars = grammars
        self.created = int(time.time())
        self.admission: Optional[Admission] = None

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        if request.path_params["model_id"] != self.model_id:
            raise APIError(404, f"model {request.path_params['model_id']!r} does not exist; this server runs "
                                f"{self.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        return await self._complete(request, parse_chat(await self._json_body(request), self.model_id))

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        return await self._complete(request, parse_completion(await self._json_body(request), self.model_id))

    # ---- the steps of a request ----

    def _model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "blobstore"}

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _json_body(self, request: Request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type in _FORM_TYPES:
            raise APIError(415, f"the body must be JSON (Content-Type: application/json), got {content_type}",
                           code="unsupported_media_type")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > self.max_body_bytes:
                raise self._too_large()
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise APIError(400, f"the body is not valid JSON: {error}") from None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_body_bytes} bytes", code="request_too_large")

    async def _complete(self, request: Request, job: Job) -> Response:
        prompt = await run_in_threadpool(self.engine.prompt, job)
        calls_format = self._tool_call_format(job)
        processor = self._grammar(job, calls_format)
        await self.admission.acquire()
        generation = Generation(self.engine, self.admission, job, prompt, processor)
        reply = Reply(self.model_id, chat=job.is_chat)
        if job.stream:
            events = self._events(generation, reply, job, len(prompt.ids), calls_format)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text, last = await self._collect(request, generation)
        finally:
            generation.cancel()
        prose, calls = calls_format.parse(text) if calls_format else (text, [])
        return JSONResponse(reply.whole(prose, last.finish_reason, _usage(len(prompt.ids), last), calls))

    def _tool_call_format(self, job: Job) -> Optional[ToolCallFormat]:
        """The format a chat answer's tool calls are read in: None without tools or with
        tool_choice none, or when the model's template teaches none (then a required call is a 400)."""
        if not job.tools or job.tool_choice == "none":
            return None
        calls_format = self.engine.tool_call_format
        if calls_format is None and job.tool_choice == "required":
            raise APIError(400, "this model's chat template has no tool-call format, so a tool call cannot be "
                                "required (tool_choice auto passes the tools to the template)", param="tool_choice")
        return calls_format

    def _grammar(self, job: Job, calls_format: Optional[ToolCallFormat]):
        if job.response_format is None and job.tool_choice != "required":
            return None
        if self.grammars is None:
            param = "response_format" if job.response_format is not None else "tool_choice"
            raise APIError(400, f"{param} needs llguidance, which this server could not load", param=param)
        if job.tool_choice == "required":
            tools = [t for t in job.tools if job.tool_name in (None, t["function"]["name"])]
            return self.grammars.tool_processor(calls_format, tools, job.parallel_tool_calls)
        return self.grammars.processor(job.response_format)

    async def _collect(self, request: Request, generation: Generation):
        texts, last, checked = [], None, time.monotonic()
        async for chunk in generation.chunks():
            texts.append(chunk.text)
            last = chunk
            if time.monotonic() - checked > DISCONNECT_POLL_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise ClientDisconnect()
        return "".join(texts), last

    async def _events(self, generation: Generation, reply: Reply, job: Job, prompt_tokens: int,
                      calls_format: Optional[ToolCallFormat]):
        """Server-sent events as OpenAI streams them: `data: {chunk}` blocks, then `data: [DONE]`.
        With a tool-call format, text from where a call may start is held back until the end, then
        sent as the calls (one delta) or, when it holds none, as text."""
        try:
            if job.is_chat:
                yield _event(reply.chunk(role=True))
            text, shown = "", 0
            async for chunk in generation.chunks():
                text += chunk.text
                if chunk.finish_reason is None:
                    visible = calls_format.holds_back(text) if calls_format else len(text)
                    if visible > shown:
                        yield _event(reply.chunk(text[shown:visible]))
                        shown = visible
                    continue
                prose, calls = calls_format.parse(text) if calls_format else (text, [])
                if len(prose) > shown:
                    yield _event(reply.chunk(prose[shown:]))
                if calls:
                    yield _event(reply.tool_calls_chunk(calls))
                yield _event(reply.chunk(finish_reason="tool_calls" if calls else chunk.finish_reason))
                if job.include_usage:
                    yield _event(reply.usage_chunk(_usage(prompt_tokens, chunk)))
        except APIError as error:
            yield _event(error.body())
        except Exception as error:  # the status line is sent: the error can only be an event now
            yield _event(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").body())
        finally:
            generation.cancel()  # a client that went away: stop at the next token, free the slot
        yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, last) -> dict:
    stats = last.stats if last is not None else None
    return usage(prompt_tokens, stats.generated_tokens if stats else 0, stats.reused_prompt_tokens if stats else 0)


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _api_error(request: Request, error: APIError) -> Response:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's error shape."""
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {error.detail}"
    return JSONResponse(APIError(error.status_code, message, type=kind).body(), status_code=error.status_code,
                        headers=getattr(error, "headers", None))


async def _internal_error(request: Request, error: Exception) -> Response:
    body = APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").body()
    return JSONResponse(body, status_code=500)
