"""The FastAPI app of `dgemma serve`: OpenAI-compatible routes and SSE streaming on top of `EngineWorker`.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming by SSE or not), GET /health.
Request bodies are `schema.ChatCompletionRequest` / `schema.CompletionRequest`; every error is OpenAI's JSON shape.
A streamed response sends OpenAI's chunks (a chat stream opens with the assistant role per choice), the opt-in
`event: dgemma.draft` events (`dgemma_drafts`: every denoising pass of a choice), a usage chunk with
`stream_options.include_usage`, then `data: [DONE]`. A client that goes away (streaming or not) frees its rows at the
engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import DgemmaError
from . import schema as S
from .worker import DEFAULT_MAX_BATCH, DEFAULT_PROMPT_CACHE_MB, EngineWorker, Job, Result, TextStream

_SEED_MOD = 2**63


# ======================================================================================================================
# From a validated body to engine jobs
# ======================================================================================================================
class Service:
    """The routes' shared state (the model, its worker, its served name) and the request -> jobs translation."""

    def __init__(self, model, worker: EngineWorker, name: str, speed: str = "exact", allow_remote_images: bool = False):
        self.model, self.worker, self.name, self.speed = model, worker, name, speed
        self.allow_remote_images = allow_remote_images
        self.created = int(time.time())
        self.task = _task(model)

    def check_task_prompt(self, prompt, param: str) -> None:
        """A task model refuses prompts it cannot take (a Sudoku model: anything but a puzzle) in one 400."""
        if self.task is None:
            return
        try:
            self.task.check_prompt(prompt, who=f"the model '{self.name}'", other="a text model")
        except DgemmaError as e:
            raise S.ApiError(400, str(e), param=param) from None

    def check_model(self, req: S._Generation) -> None:
        if req.model is None:
            raise S.ApiError(400, "'model' is required", param="model")
        if req.model != self.name:
            raise S.ApiError(404, f"The model '{req.model}' does not exist; this server serves '{self.name}'",
                             param="model", code="model_not_found")

    def chat_prompt(self, req: S.ChatCompletionRequest) -> list[int] | ImagePrompt:
        """The prompt's token ids; for messages with images an ImagePrompt that the worker thread encodes (the
        vision tower runs where the model runs)."""
        messages = [m.plain(i) for i, m in enumerate(req.messages)]
        self.check_task_prompt(messages, "messages")
        if any(m.image_parts() for m in req.messages):
            return ImagePrompt(self.model, _checked_image_urls(req, messages, self.allow_remote_images))
        if self.model.tokenizer is None:
            raise S.ApiError(400, "this model has no tokenizer: use /v1/completions with token ids")
        extra = {"tools": req.tools} if req.tools else {}  # the chat template renders the declared tools
        try:
            return self.model.tokenizer.encode_chat(messages, **extra)
        except DgemmaError as e:
            raise S.ApiError(400, str(e), param="messages") from None

    def completion_prompts(self, req: S.CompletionRequest) -> list[list[int]]:
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                self.check_task_prompt(p, "prompt")
                if self.model.tokenizer is None:
                    raise S.ApiError(400, "this model has no tokenizer: pass token ids", param="prompt")
                out.append(self.model.tokenizer.encode(p))
            else:
                out.append(list(p))
        return out

    def check_ids(self, ids: list[int], settings, param: str) -> None:
        cfg = self.model.config
        C, limit = cfg.canvas_length, cfg.max_position_embeddings
        needed = len(ids) + -(-settings.max_new_tokens // C) * C
        if needed > limit:
            raise S.ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                                  f"tokens and {settings.max_new_tokens} new tokens (whole canvases of {C}) need "
                                  f"{needed}", param=param, code="context_length_exceeded")
        if not ids:
            raise S.ApiError(400, "the prompt is empty", param=param)
        bad = next((t for t in ids if not 0 <= t < cfg.vocab_size), None)
        if bad is not None:
            raise S.ApiError(400, f"token id {bad} is outside the vocabulary (0..{cfg.vocab_size - 1})", param=param)

    def jobs(self, req: S._Generation, prompts: list[list[int]], deliver_for, param: str, spec=None) -> list[Job]:
        """One job per (prompt, choice): choice i of the request uses seed + i; each has its own grammar state when
        the request asks for structured output (`spec`)."""
        req.check_supported()
        settings = req.settings(self.model.sampler_defaults)
        for ids in prompts:
            if not isinstance(ids, ImagePrompt):  # an image prompt's length is known once encoded (the engine checks)
                self.check_ids(ids, settings, param)
        speed = self._speed(req, spec)
        grammar = self._grammar(spec, settings)
        n = req.n or 1
        jobs = []
        for p, ids in enumerate(prompts):
            checker = self._checker(req, ids)
            for c in range(n):
                idx = p * n + c
                seed = (req.seed + idx) % _SEED_MOD if req.seed is not None else secrets.randbits(63)
                extra = {**speed, "constraint": grammar.new_row()} if grammar is not None else speed
                images = ids if isinstance(ids, ImagePrompt) else None
                request = self._engine_request([] if images else ids, settings, seed, req, checker, extra)
                jobs.append(Job(request, TextStream(self.model.tokenizer, settings, req.stops()), deliver_for(idx),
                                drafts=bool(req.dgemma_drafts), prepare=images))
        return jobs

    @staticmethod
    def _engine_request(ids, settings, seed: int, req: S._Generation, checker, extra: dict):
        from ..engine import Request

        return Request(prompt_ids=list(ids), settings=settings, seed=seed, attempts=req.attempts or 1,
                       checker=checker, max_retries=req.max_retries or 0, stop_when_valid=bool(req.stop_when_valid),
                       drafts=bool(req.dgemma_drafts), **extra)

    def _checker(self, req: S._Generation, ids):
        if not req.wants_checker:
            return None
        if isinstance(ids, ImagePrompt):
            raise S.ApiError(400, "attempts, max_retries and stop_when_valid take text prompts", param="messages")
        checker = task_checker(self.model, ids)
        if checker is None:
            param = next(p for p in ("attempts", "max_retries", "stop_when_valid") if getattr(req, p))
            raise S.ApiError(400, f"'{param}' needs a checker, and this model's task has none (a plain text model)",
                             param=param)
        return checker

    def _speed(self, req: S._Generation, spec) -> dict:
        """speed="fast" denoises only what still changes (the engine refuses it where it cannot apply); a request
        without one gets the server's (`--speed`), except structured output, which runs exact."""
        if req.speed is not None:
            return {"speed": req.speed}
        return {"speed": self.speed} if spec is None else {}

    def structured(self, req: S._Generation):
        """The request's structured-output spec (response_format, tools, vLLM's guided_* / structured_outputs), or
        None for free text."""
        body = req.model_dump(exclude_none=True)
        if not any(body.get(k) for k in STRUCTURED_FIELDS) or body.get("response_format") == {"type": "text"}:
            return None
        param = next(k for k in STRUCTURED_FIELDS if body.get(k))
        try:
            from ..structured import StructuredSpec
        except ImportError:
            raise S.ApiError(400, f"'{param}' is not supported yet by dgemma serve", param=param) from None
        try:
            return StructuredSpec.from_openai(body)
        except DgemmaError as e:
            raise S.ApiError(400, str(e), param=param) from None

    def _grammar(self, spec, settings):
        if spec is None:
            return None
        from ..structured import compile as compile_grammar

        try:
            return compile_grammar(spec, self.model.tokenizer, self.model.config.vocab_size, settings.eos_token_ids)
        except DgemmaError as e:
            raise S.ApiError(400, str(e), param="tools" if spec.kind == "tool_call" else "response_format") from None


STRUCTURED_FIELDS = ("response_format", "tools", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                     "structured_outputs")


class ImagePrompt:
    """Chat messages with image parts, encoded on the worker thread just before the engine takes the request:
    `prepare(request)` sets its prompt ids (image tokens laid out) and image embeddings."""

    def __init__(self, model, messages: list[dict]):
        self.model, self.messages = model, messages

    def __call__(self, request) -> None:
        ids, fields = self.model.encode_with_images(self.messages, chat=True)
        request.prompt_ids = ids
        for name, value in fields.items():
            setattr(request, name, value)
        request.cacheable = False  # the prompt cache keys on token ids, which do not tell two images apart


REMOTE_IMAGE_BYTES = 20 << 20     # --allow-remote-images: the most one image URL may send
REMOTE_IMAGE_SECONDS = 10.0       # and how long it may take


def _checked_image_urls(req: S.ChatCompletionRequest, messages: list[dict], allow_remote: bool = False) -> list[dict]:
    """Images come inside the request as data: URLs; the server reads no file a client names and fetches http(s)
    URLs only when started with --allow-remote-images (then within a size and a time limit)."""
    for i, m in enumerate(req.messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            if part.type not in S.IMAGE_PARTS:
                continue
            extra = part.model_extra or {}
            source = extra.get("image_url") if part.type == "image_url" else next(
                (extra.get(k) for k in ("image", "url", "path") if extra.get(k) is not None), None)
            url = source.get("url") if isinstance(source, dict) else source
            where = f"messages[{i}].content[{j}]"
            if allow_remote and isinstance(url, str) and url.startswith(("http://", "https://")):
                messages[i]["content"][j] = {"type": "image", "image": _fetch_image(url, where)}
                continue
            if not isinstance(url, str) or not url.startswith("data:image/"):
                hint = "" if allow_remote else " (start the server with --allow-remote-images to fetch http(s) URLs)"
                raise S.ApiError(400, f"{where}: an image must be a data: URL (data:image/<type>;base64,...){hint}; "
                                      "the server reads no file", param="messages")
    return messages


def _fetch_image(url: str, where: str) -> bytes:
    """The bytes behind an image URL, at most REMOTE_IMAGE_BYTES within REMOTE_IMAGE_SECONDS, else a 400."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + REMOTE_IMAGE_SECONDS
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_IMAGE_SECONDS) as r:  # noqa: S310 - opt-in, http(s) only
            data = b""
            while len(data) <= REMOTE_IMAGE_BYTES:
                chunk = r.read(1 << 16)
                if not chunk:
                    return data
                data += chunk
                if time.monotonic() > deadline:
                    raise S.ApiError(400, f"{where}: the image at {url} took over {REMOTE_IMAGE_SECONDS:.0f} s",
                                     param="messages")
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise S.ApiError(400, f"{where}: could not fetch {url} ({e})", param="messages") from None
    raise S.ApiError(400, f"{where}: the image at {url} is over {REMOTE_IMAGE_BYTES >> 20} MB", param="messages")


def _task(model):
    """The task module the checkpoint declares (None for plain text)."""
    try:
        from ..tasks import task_of
    except ImportError:
        return None
    return task_of(model.checkpoint)


def task_checker(model, prompt_ids: list[int]):
    """The checker of the checkpoint's task for one request's prompt (`checker(row, canvas) -> bool mask`), or None
    when the task has none. A task module may export `request_checker(model, prompt_ids)`; the Sudoku task's checker
    is built from the puzzle the prompt encodes."""
    task = _task(model)
    hook = getattr(task, "request_checker", None)
    if hook is not None:
        return hook(model, prompt_ids)
    if getattr(task, "NAME", None) != "sudoku":
        return None
    from ..tasks.sudoku.task import BOS, decode_board, make_checker

    cells = prompt_ids[1:] if prompt_ids and prompt_ids[0] == BOS else prompt_ids  # <bos> + 81 cells + ...
    return make_checker([decode_board(cells)])  # the engine calls it with row 0 for every attempt


# ======================================================================================================================
# Responses
# ======================================================================================================================
def usage(results: list[Result]) -> S.Usage:
    prompt = sum(r.prompt_tokens for r in results)
    completion = sum(r.completion_tokens for r in results)
    passes = sum(r.decoder_passes for r in results)
    weighted = sum(r.tokens_per_forward * r.decoder_passes for r in results)  # GenerationStats' definition
    return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=S.PromptTokensDetails(cached_tokens=sum(r.cached_tokens for r in results)),
                   tokens_per_forward=weighted / passes if passes else 0.0, decoder_passes=passes,
                   canvases=sum(r.canvases for r in results))


def sse(obj: Any, event: str | None = None) -> str:
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def tool_reply(text: str, finish_reason: str, spec) -> tuple[str | None, list | None, str]:
    """(content, tool_calls, finish_reason) of a chat reply: a reply that is a call of a declared tool becomes
    OpenAI's tool_calls (finish reason "tool_calls")."""
    if spec is None or spec.kind != "tool_call":
        return text, None, finish_reason
    from ..structured import parse_tool_calls

    content, calls = parse_tool_calls(text, spec)
    return (content, calls, "tool_calls") if calls else (text, None, finish_reason)


def _whole(chat: bool, rid: str, created: int, name: str, results: list[Result], spec=None):
    u = usage(results)
    if chat:
        choices = []
        for i, r in enumerate(results):
            content, calls, finish = tool_reply(r.text, r.finish_reason, spec)
            choices.append(S.ChatChoice(index=i, message=S.AssistantMessage(content=content, tool_calls=calls),
                                        finish_reason=finish))
        return S.ChatCompletion(id=rid, created=created, model=name, choices=choices, usage=u)
    choices = [S.CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason) for i, r in enumerate(results)]
    return S.Completion(id=rid, created=created, model=name, choices=choices, usage=u)


class _Chunks:
    """The SSE chunks of one streamed response."""

    def __init__(self, chat: bool, rid: str, created: int, name: str, include_usage: bool, spec=None):
        self.chat, self.rid, self.created, self.name, self.include_usage = chat, rid, created, name, include_usage
        # a tool-call reply is only known once whole: its text is held back and sent at the end as content or calls
        self.tools = spec if chat and spec is not None and spec.kind == "tool_call" else None

    def choice(self, idx: int, text: str | None = None, finish: str | None = None, role: bool = False,
               tool_calls: list | None = None) -> str:
        if self.chat:
            calls = [{**c, "index": k} for k, c in enumerate(tool_calls)] if tool_calls else None
            delta = S.ChatDelta(role="assistant" if role else None, content=text, tool_calls=calls)
            chunk = S.ChatCompletionChunk(id=self.rid, created=self.created, model=self.name,
                                          choices=[S.ChatChunkChoice(index=idx, delta=delta, finish_reason=finish)])
        else:
            chunk = S.CompletionChunk(id=self.rid, created=self.created, model=self.name,
                                      choices=[S.CompletionChunkChoice(index=idx, text=text or "",
                                                                       finish_reason=finish)])
        return self._dump(chunk)

    def usage(self, results: list[Result]) -> str:
        cls = S.ChatCompletionChunk if self.chat else S.CompletionChunk
        return self._dump(cls(id=self.rid, created=self.created, model=self.name, choices=[], usage=usage(results)))

    def _dump(self, chunk) -> str:
        data = chunk.model_dump(exclude=None if self.include_usage else {"usage"})
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def next_event(request, events: asyncio.Queue, state: dict, every: float = 0.5):
    """The next worker event for a handler, or None once its client has gone. The client is checked at least every
    `every` seconds however busy the queue is (a fast model queues an event every few milliseconds, so checking only
    when the queue goes quiet would never notice a client that left); `state` keeps the next check's time."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=every)
        except asyncio.TimeoutError:
            event = None
        now = time.monotonic()
        if now >= state.get("next_check", 0.0):
            state["next_check"] = now + every
            if await request.is_disconnected():
                return None
        if event is not None:
            return event


# ======================================================================================================================
# The app
# ======================================================================================================================
def create_app(model, *, model_name: str = "dgemma", max_batch: int = DEFAULT_MAX_BATCH, batching: str = "merged",
               prompt_cache_mb: float = DEFAULT_PROMPT_CACHE_MB, speed: str = "exact",
               worker: EngineWorker | None = None, allow_remote_images: bool = False):
    """The ASGI app. The worker thread starts with the app (lifespan) and stops with it. `speed` is the default for
    requests that do not send one."""
    if speed not in S.SPEEDS:
        from ..errors import InputError

        raise InputError(f"--speed must be one of {', '.join(S.SPEEDS)}, not {speed!r}")
    worker = worker if worker is not None else EngineWorker(model, max_batch=max_batch, batching=batching,
                                                            prompt_cache_mb=prompt_cache_mb)
    svc = Service(model, worker, model_name, speed, allow_remote_images)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="dgemma serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = worker
    app.state.service = svc

    def error(e: S.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(S.ApiError)
    async def api_error(request, exc: S.ApiError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(S.ApiError(exc.status_code, str(exc.detail) or "error", "invalid_request_error"))

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return error(S.ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.get("/v1/models", response_model=S.ModelList)
    async def models():
        cfg = model.config
        card = S.ModelCard(id=svc.name, created=svc.created, max_model_len=cfg.max_position_embeddings,
                           canvas_length=cfg.canvas_length)
        return S.ModelList(data=[card])

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name, "backend": model.backend.describe(), **worker.stats()}

    def body_schema(cls) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": cls.model_json_schema()}}}}

    @app.post("/v1/chat/completions", openapi_extra=body_schema(S.ChatCompletionRequest))
    async def chat_completions(request: Request):
        req = S.parse_request(S.ChatCompletionRequest, await request.body())
        svc.check_model(req)
        return await run(request, req, [svc.chat_prompt(req)], chat=True)

    @app.post("/v1/completions", openapi_extra=body_schema(S.CompletionRequest))
    async def completions(request: Request):
        req = S.parse_request(S.CompletionRequest, await request.body())
        svc.check_model(req)
        return await run(request, req, svc.completion_prompts(req), chat=False)

    async def run(request: Request, req: S._Generation, prompts: list[list[int]], chat: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver_for(idx: int):
            return lambda ev: loop.call_soon_threadsafe(events.put_nowait, (idx, ev))

        spec = svc.structured(req)
        jobs = svc.jobs(req, prompts, deliver_for, param="messages" if chat else "prompt", spec=spec)
        worker.submit(jobs)
        watch: dict = {}
        early: list = []  # events that overtook an acknowledgement (drafts, chunks of a fast job)
        try:
            accepted = 0
            while accepted < len(jobs):
                item = await next_event(request, events, watch)
                if item is None:
                    worker.cancel(jobs)
                    return error(S.ApiError(499, "client closed the request"))
                kind = item[1][0]
                if kind == "error":
                    worker.cancel(jobs)
                    return error(S.ApiError(item[1][1], item[1][2]))
                if kind == "accepted":
                    accepted += 1
                else:
                    early.append(item)
        except BaseException:
            worker.cancel(jobs)
            raise
        for item in early:
            events.put_nowait(item)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if req.stream:
            chunks = _Chunks(chat, rid, created, svc.name, req.include_usage, spec)
            return StreamingResponse(stream(request, jobs, events, chunks, rid), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results: dict[int, Result] = {}
        try:
            while len(results) < len(jobs):
                item = await next_event(request, events, watch)
                if item is None:
                    return error(S.ApiError(499, "client closed the request"))
                idx, ev = item
                if ev[0] == "done":
                    results[idx] = ev[1]
                elif ev[0] == "error":
                    return error(S.ApiError(ev[1], ev[2]))
        finally:
            worker.cancel(jobs)
        return _whole(chat, rid, created, svc.name, [results[i] for i in range(len(jobs))], spec)

    async def stream(request: Request, jobs: list[Job], events: asyncio.Queue, chunks: _Chunks, rid: str):
        finished: dict[int, Result] = {}
        try:
            if chunks.chat:
                for i in range(len(jobs)):
                    yield chunks.choice(i, "", role=True)
            watch: dict = {}
            while len(finished) < len(jobs):
                item = await next_event(request, events, watch)
                if item is None:
                    return
                idx, ev = item
                if ev[0] == "chunk" and ev[1] and chunks.tools is None:
                    yield chunks.choice(idx, ev[1])
                elif ev[0] == "draft":
                    yield sse(S.DraftPayload(id=rid, index=idx, **ev[1]), event="dgemma.draft")
                elif ev[0] == "done":
                    finished[idx] = r = ev[1]
                    finish = r.finish_reason
                    if chunks.tools is not None:
                        content, calls, finish = tool_reply(r.text, finish, chunks.tools)
                        yield chunks.choice(idx, content, tool_calls=calls)
                    yield chunks.choice(idx, None if chunks.chat else "", finish=finish)
                elif ev[0] == "error":
                    yield sse(S.ApiError(ev[1], ev[2]).body())
                    return
            if chunks.include_usage:
                yield chunks.usage([finished[i] for i in range(len(jobs))])
            yield "data: [DONE]\n\n"
        finally:  # a client that went away frees its rows at the engine's next step
            worker.cancel(jobs)

    return app
