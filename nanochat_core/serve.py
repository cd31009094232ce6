"""
The chat server:  python -m nanochat_core.serve [--host 127.0.0.1] [--port 8000] [--checkpoint DIR]

  GET  /                      the chat page (one self-contained file: works with no internet)
  POST /v1/chat/completions   OpenAI-compatible, non-streaming or `stream: true` (SSE, ends `data: [DONE]`)
  GET  /v1/models, GET /health

Requests are validated up front (the reference web chat's limits, docs/ARCHITECTURE.md) and refused with a 4xx in OpenAI's error shape
{"error": {"message", "type", "param", "code"}}: a bad request is the client's problem, never a 500.
Generation runs on worker threads, one per model replica (one per GPU; one on CPU) fed from one queue,
so concurrent requests wait their turn instead of fighting over a device; a full queue answers 429.
A streaming client that disconnects cancels its generation between tokens.

Tool calls travel inside the message text as the model's own markers,
  <|python_start|>12*7<|python_end|><|output_start|>84<|output_end|>,
so the page can render them distinctly and a client that sends the history back gets the same tokens
(the markers are parsed back into parts; in user text they stay plain text).
"""
# (no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime)
import argparse
import asyncio
import json
import queue
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat_core.common import NanochatError, autodetect_device_type, run_main

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20
MAX_OUTPUT_TOKENS = 4096
DEFAULTS = dict(temperature=0.6, top_k=50, max_tokens=512)
STATIC = Path(__file__).parent / "static"

OPEN = {"text": "", "python": "<|python_start|>", "python_output": "<|output_start|>"}
CLOSE = {"text": "", "python": "<|python_end|>", "python_output": "<|output_end|>"}
_MARKUP = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -----------------------------------------------------------------------------
# Request validation

@dataclass
class ChatRequest:
    messages: list[dict]
    temperature: float
    top_k: int
    top_p: float | None
    max_tokens: int
    seed: int | None
    stream: bool
    include_usage: bool = False   # stream_options.include_usage: a last chunk with token counts


def _number(body: dict, name: str, lo: float, hi: float, default: Any, integer: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} between {lo} and {hi}, got {json.dumps(v)[:40]}", name)
    return v


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):   # OpenAI's array form: [{"type": "text", "text": "..."}]
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{i}].content must be a string", "messages")


def parse_request(raw: bytes) -> ChatRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):   # RecursionError: absurdly deep nesting
        raise APIError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise APIError(400, f"too many messages ({len(msgs)} > {MAX_MESSAGES})", "messages")
    messages, total = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", "messages")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {json.dumps(role)[:40]} is not supported: use system, user or assistant", "messages")
        text = _text_content(m.get("content"), i)
        if len(text) > MAX_MESSAGE_CHARS:
            raise APIError(400, f"messages[{i}] has {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}", "messages")
        total += len(text)
        if role != "assistant" and not text.strip():
            raise APIError(400, f"messages[{i}] ({role}) is empty", "messages")
        messages.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise APIError(400, f"the conversation has {total} characters; the limit is {MAX_TOTAL_CHARS}", "messages")
    _check_order([m["role"] for m in messages])
    if body.get("n", 1) != 1:
        raise APIError(400, "'n' must be 1: one reply per request", "n")
    if body.get("stop") not in (None, [], ""):
        raise APIError(400, "'stop' sequences are not supported", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    if top_p is not None and top_p <= 0.0:
        raise APIError(400, "'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise APIError(400, "'seed' must be a non-negative integer", "seed")
    return ChatRequest(
        messages=messages,
        temperature=_number(body, "temperature", 0.0, 2.0, DEFAULTS["temperature"]),
        top_k=_number(body, "top_k", 0, 200, DEFAULTS["top_k"], integer=True),
        top_p=top_p,
        max_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 1, MAX_OUTPUT_TOKENS, DEFAULTS["max_tokens"], integer=True),
        seed=seed,
        stream=stream,
        include_usage=isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage") is True,
    )


def _check_order(roles: list[str]) -> None:
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        raise APIError(400, "only the first message may be a system message", "messages")
    for i, role in enumerate(body):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise APIError(400, "messages must alternate user, assistant, user, ... (after an optional system message)", "messages")
    if not body or body[-1] != "user":
        raise APIError(400, "the last message must be from the user", "messages")


def content_to_parts(text: str) -> list[dict]:
    """An assistant message's text (with tool markers) -> the parts render_conversation takes."""
    parts, last = [], 0
    for m in _MARKUP.finditer(text):
        if m.start() > last:
            parts.append({"type": "text", "text": text[last:m.start()]})
        kind = "python" if m.group(1) is not None else "python_output"
        parts.append({"type": kind, "text": m.group(1) if m.group(1) is not None else m.group(2)})
        last = m.end()
    if last < len(text) or not parts:
        parts.append({"type": "text", "text": text[last:]})
    return parts


class Markup:
    """Turns streamed pieces back into text with tool markers (tracks which segment is open)."""

    def __init__(self):
        self.kind = "text"

    def feed(self, kind: str, text: str) -> str:
        out = ""
        if kind != self.kind:
            out = CLOSE[self.kind] + OPEN[kind]
            self.kind = kind
        return out + text

    def close(self) -> str:
        return self.feed("text", "")


# -----------------------------------------------------------------------------
# Worker pool

@dataclass(eq=False)   # compared (and hashed) by identity: jobs live in a set while running
class Job:
    ids: list[int]
    req: ChatRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:   # the event loop is gone (server shutting down): nobody is listening
            self.cancel.set()


class WorkerPool:
    """One thread per Engine, all taking jobs from one queue. Each job's pieces go to its asyncio queue,
    then an exception (if generation failed) and always a final None."""

    def __init__(self, engines: list, max_queue: int):
        self.engines, self.max_queue = engines, max_queue
        self.jobs: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []
        self.running: set[Job] = set()

    def start(self) -> None:
        for i, engine in enumerate(self.engines):
            t = threading.Thread(target=self._work, args=(engine,), name=f"nanochat-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        for job in list(self.running):   # shutting down: abandon replies in progress
            job.cancel.set()
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join(timeout=10)
        self.threads = []

    def submit(self, job: Job) -> None:
        if self.jobs.qsize() >= self.max_queue:
            raise APIError(429, f"the server is busy ({self.max_queue} requests waiting): retry shortly",
                           code="server_busy", type="rate_limit_error")
        self.jobs.put(job)

    def _work(self, engine: Any) -> None:
        while (job := self.jobs.get()) is not None:
            self.running.add(job)
            try:
                if job.cancel.is_set():
                    continue
                r = job.req
                for piece in engine.stream_reply(job.ids, max_tokens=r.max_tokens, temperature=r.temperature,
                                                 top_k=r.top_k or None, top_p=r.top_p, seed=r.seed, cancel=job.cancel):
                    job.put(piece)
            except Exception as e:   # a bug or a device error: report it to this request, keep serving
                job.put(e)
            finally:
                self.running.discard(job)
                job.put(None)


# -----------------------------------------------------------------------------
# The app

def create_app(models: Any, tokenizer: Any, model_name: str = "nanochat", max_queue: int = 64):
    """FastAPI app over already-loaded model(s): one model, or a list of replicas (one worker each)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from nanochat_core.engine import Engine

    engines = [Engine(m, tokenizer) for m in (models if isinstance(models, (list, tuple)) else [models])]
    context_len = min(e.context_len for e in engines)
    pool = WorkerPool(engines, max_queue)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(APIError(400, "invalid request").body(), status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "workers": len(engines), "queued": pool.jobs.qsize()}

    @app.get("/v1/models")
    async def models_list():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        req = parse_request(bytes(raw))
        conv = [m if m["role"] != "assistant" else {"role": "assistant", "content": content_to_parts(m["content"])}
                for m in req.messages]
        try:
            ids = tokenizer.render_for_completion({"messages": conv})
        except NanochatError as e:
            raise APIError(400, str(e), "messages") from None
        if len(ids) >= context_len:
            raise APIError(400, f"the conversation is {len(ids)} tokens; the model's context holds {context_len}",
                           "messages", code="context_length_exceeded")
        job = Job(ids, req, asyncio.get_running_loop())
        pool.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:   # no caching, and no buffering by a reverse proxy in front of us: tokens go out as made
            return StreamingResponse(_sse(job, rid, now), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, rid, now)

    def chunk(rid: str, now: int, delta: dict, finish: str | None = None) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    async def _sse(job: Job, rid: str, now: int):
        markup, finish, n = Markup(), "length", 0
        try:
            yield chunk(rid, now, {"role": "assistant", "content": ""})
            while (item := await job.out.get()) is not None:
                if isinstance(item, Exception):
                    yield f"data: {json.dumps(APIError(500, f'generation failed: {item}', type='server_error').body())}\n\n"
                    continue
                if item.kind == "finish":
                    finish, n = ("stop" if item.text == "stop" else "length"), item.num_tokens
                    continue
                if text := markup.feed(item.kind, item.text):
                    yield chunk(rid, now, {"content": text})
            if tail := markup.close():
                yield chunk(rid, now, {"content": tail})
            yield chunk(rid, now, {}, finish)
            if job.req.include_usage:
                usage = {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}
                body = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [], "usage": usage}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()   # client gone (or done): stop generating for it

    async def _complete(job: Job, rid: str, now: int):
        markup, text, finish, n = Markup(), [], "length", 0
        while (item := await job.out.get()) is not None:
            if isinstance(item, Exception):
                job.cancel.set()
                raise APIError(500, f"generation failed: {item}", type="server_error")
            if item.kind == "finish":
                finish, n = ("stop" if item.text == "stop" else "length"), item.num_tokens
            else:
                text.append(markup.feed(item.kind, item.text))
        text.append(markup.close())
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}}

    return app


def run_server(host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None, device: str | None = None) -> None:
    """Load the checkpoint (the latest local run if None) - one replica per GPU when several - and serve."""
    import torch
    import uvicorn

    from nanochat_core.chat import find_checkpoint
    from nanochat_core.checkpoint import load_model

    if not 0 < port < 65536:
        raise NanochatError(f"--port must be between 1 and 65535 (got {port})")
    _check_port_free(host, port)
    path = find_checkpoint(checkpoint)
    device = device or autodetect_device_type()
    devices = [device]
    if device == "cuda" and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    models, tokenizer, meta = [], None, {}
    for d in devices:
        model, tokenizer, meta = load_model(path, d)
        models.append(model)
    ckpt = Path(meta.get("path", path))
    name = f"nanochat-{ckpt.parent.parent.name}-{ckpt.parent.name}"   # run and stage: nanochat-<run>-sft
    app = create_app(models, tokenizer, model_name=name)
    print(f"nanochat: serving {meta.get('path', path)} on {', '.join(devices)} at http://{host}:{port}/", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the model", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", ws="none")


def _check_port_free(host: str, port: int) -> None:
    """uvicorn logs and exits on a busy port; say it in one line before loading a model instead."""
    import socket
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise NanochatError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.serve", description="Web chat + OpenAI-compatible API.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory (default: the latest run)")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: auto)")
    a = p.parse_args()
    run_server(a.host, a.port, a.checkpoint, a.device)


if __name__ == "__main__":
    run_main(main)
