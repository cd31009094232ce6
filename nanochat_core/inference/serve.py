"""
The chat server:  python -m nanochat_core.inference.serve [--host 127.0.0.1] [--port 8000] [--checkpoint DIR] [--api-key KEY]

  GET  /                      the chat page (one self-contained file: works with no internet)
  POST /v1/chat/completions   OpenAI-compatible, non-streaming or `stream: true` (SSE, ends `data: [DONE]`)
  GET  /v1/models, GET /v1/models/{id}, GET /health

Request bodies are pydantic models (api_models.py) that FastAPI validates; every refusal is a 4xx in
OpenAI's error shape {"error": {"message", "type", "param", "code"}}: a bad request is the client's
problem, never a 500. What faces the network (Host check, API key, JSON only, timeouts, connection cap,
drain on SIGTERM) is in serve_net.py. A server bound to anything but loopback needs an API key.

Generation runs on worker threads, one per model replica (one per GPU; one on CPU) fed from one queue,
so concurrent requests wait their turn instead of fighting over a device; a full queue answers 429.
A client that disconnects - streaming or not, running or still queued - cancels its generation
(between tokens), so abandoned requests never hold the queue.

The context is the sequence length the model was trained with: prompt + max_tokens beyond it is refused
(400 context_length_exceeded), as OpenAI and vLLM do - a client that asked for N tokens must learn it cannot
have them, not get fewer in silence. Without max_tokens the reply gets min(512, what is left): the page
sends none unless its field is filled in, so a 256-token model answers its first message, and when the
conversation outgrows the context the page leaves out the oldest exchange and sends again.
A `stop` sequence cuts the reply before it (finish_reason "stop"); while streaming, text that might be the
start of a stop sequence is held back until it is known not to be.
An error during generation ends a stream with an error event (`data: {"error": ...}`) and no
finish_reason and no [DONE]: a client can tell a cut reply from a finished one.

Tool calls are text in `content`, written as every surface writes them (calculator.ToolText):
  Let me compute [calc 12*7 = 84] so it is 84.
Never the model's special tokens (<|python_start|>...), and never OpenAI's `tool_calls` fields: those ask
the client to run a function and send back a `tool` message, while nanochat's calculator runs here, in the
middle of the reply, and the reply goes on after its result (the Chat Completions format has no field for a
tool the server runs itself). A client that sends the history back gets the model's exact tokens: in an assistant
message "[calc EXPR = RESULT]" is parsed back into a call and its output (in user text it stays plain text).
The round trip is exact unless the expression itself contains "]" or " = " (a string literal could).

Models: the server answers to the checkpoint's exact id (nanochat-<run>-<stage>) and to the stable alias
"nanochat", so a client configured once keeps working across runs; /v1/models lists both, the alias with
`root` naming the model it stands for, and replies name the exact id (as OpenAI's aliases name the snapshot).
"""
# (no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime)
import argparse
import asyncio
import collections
import json
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat_core.inference.api_models import DEFAULTS, ChatCompletionRequest, validation_error_body
from nanochat_core.inference.calculator import CALC_CLOSE, CALC_OPEN, CALC_SEP, ToolText
from nanochat_core.common import NanochatError, autodetect_device_type, run_main
from nanochat_core.inference.engine import Engine
from nanochat_core.inference.serve_net import Gate, Limits, is_loopback, make_server
import torch
from nanochat_core.inference.chat import find_checkpoint
from nanochat_core.gpt.checkpoint import load_model
from nanochat_core.gpt.quantize import resolve_dtype
import socket

STATIC = Path(__file__).parent / "static"

ALIAS = "nanochat"   # the name a client can always use, whatever run is being served
_CALL = re.compile(re.escape(CALC_OPEN) + r"([^\]]*)" + re.escape(CALC_CLOSE))


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def content_to_parts(text: str) -> list[dict]:
    """An assistant message's text -> the parts render_conversation takes: each [calc EXPR = RESULT] (how
    replies show a tool call) becomes a python part and a python_output part, so the model sees its own tokens."""
    parts, last = [], 0
    for m in _CALL.finditer(text):
        if m.start() > last:
            parts.append({"type": "text", "text": text[last:m.start()]})
        expr, sep, result = m.group(1).partition(CALC_SEP)
        parts.append({"type": "python", "text": expr})
        if sep:
            parts.append({"type": "python_output", "text": result})
        last = m.end()
    if last < len(text) or not parts:
        parts.append({"type": "text", "text": text[last:]})
    return parts


class StopFilter:
    """Cuts reply text at the first stop sequence. Text that could be the beginning of one is held back
    until the next piece shows whether it is, so a stream never shows a stop sequence (or half of one)."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, text: str) -> str:
        if self.stopped or not self.stops:
            return "" if self.stopped else text
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return buf[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# -----------------------------------------------------------------------------
# Worker pool

@dataclass(eq=False)   # compared (and hashed) by identity: jobs live in a set while running
class Job:
    ids: list[int]
    req: ChatCompletionRequest
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:   # the event loop is gone (server shutting down): nobody is listening
            self.cancel.set()


class WorkerPool:
    """One thread per Engine, all taking jobs from one waiting line. Each job's pieces go to its asyncio
    queue, then an exception (if generation failed) and always a final None. A cancelled job leaves the
    line at once: it no longer counts towards max_queue and no worker ever starts it."""

    def __init__(self, engines: list, max_queue: int):
        self.engines, self.max_queue = engines, max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.ready = threading.Condition()
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.running: set[Job] = set()

    def start(self) -> None:
        self.closed = False
        for i, engine in enumerate(self.engines):
            t = threading.Thread(target=self._work, args=(engine,), name=f"nanochat-worker-{i}", daemon=True)
            t.start()
            self.threads.append(t)

    def queued(self) -> int:
        with self.ready:
            self._drop_cancelled()
            return len(self.waiting)

    def _drop_cancelled(self) -> None:
        if any(j.cancel.is_set() for j in self.waiting):
            for j in self.waiting:
                if j.cancel.is_set():
                    j.put(None)   # never started: its request handler is waiting for this end
            self.waiting = collections.deque(j for j in self.waiting if not j.cancel.is_set())

    def submit(self, job: Job) -> None:
        with self.ready:
            self._drop_cancelled()
            if self.closed:
                raise APIError(503, "the server is shutting down: retry shortly", code="shutting_down", type="server_error")
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the server is busy ({self.max_queue} requests waiting): retry shortly",
                               code="server_busy", type="rate_limit_error")
            self.waiting.append(job)
            self.ready.notify()

    def abort(self, reason: str) -> None:
        """Shutting down: every reply waiting or in progress ends now with a 503 / an error event.
        Runs on the event loop's thread (it writes to the jobs' asyncio queues directly)."""
        with self.ready:
            self.closed = True
            jobs = list(self.waiting) + list(self.running)
        for job in jobs:
            job.cancel.set()
            job.out.put_nowait(APIError(503, reason, code="shutting_down", type="server_error"))

    def stop(self) -> None:
        with self.ready:
            self.closed = True
            for job in list(self.waiting) + list(self.running):
                job.cancel.set()
            self._drop_cancelled()
            self.ready.notify_all()
        for t in self.threads:
            t.join(timeout=10)
        self.threads = []

    def _next(self) -> Job | None:
        with self.ready:
            while True:
                self._drop_cancelled()
                if self.closed:
                    return None
                if self.waiting:
                    job = self.waiting.popleft()
                    self.running.add(job)
                    return job
                self.ready.wait()

    def _work(self, engine: Any) -> None:
        while (job := self._next()) is not None:
            try:
                r = job.req
                for piece in engine.stream_reply(job.ids, max_tokens=job.max_tokens,
                                                 temperature=DEFAULTS["temperature"] if r.temperature is None else r.temperature,
                                                 top_k=(DEFAULTS["top_k"] if r.top_k is None else r.top_k) or None,
                                                 top_p=r.top_p, seed=r.seed, cancel=job.cancel):
                    job.put(piece)
            except Exception as e:   # a bug or a device error: report it to this request, keep serving
                job.put(e)
            finally:
                with self.ready:
                    self.running.discard(job)
                job.put(None)


# -----------------------------------------------------------------------------
# The app

def create_app(models: Any, tokenizer: Any, model_name: str = "nanochat", max_queue: int = 64,
               api_key: str | None = None, check_host: bool = True, limits: Any = None,
               system_prompt: str | None = None):
    """FastAPI app over already-loaded model(s): one model, or a list of replicas (one worker each).
    api_key: required as `Authorization: Bearer` on /v1/*; check_host: answer only requests addressed to a
    loopback name (for a server bound to loopback); limits: serve_net.Limits (body size and timeouts);
    system_prompt: put in front of a conversation that brings no system message of its own (the model's
    --identity by default; a request's own system message overrides it)."""
    from fastapi import FastAPI, Request   # lazy: an optional dependency
    from fastapi.exceptions import RequestValidationError   # lazy: an optional dependency
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse   # lazy: an optional dependency
    from starlette.exceptions import HTTPException as StarletteHTTPException   # lazy: an optional dependency


    models = list(models) if isinstance(models, (list, tuple)) else [models]
    engines = [Engine(m, tokenizer) for m in models]
    # the context is what the model was trained on: attention beyond its sequence length was never learned
    context_len = min(m.config.sequence_len for m in models)
    pool = WorkerPool(engines, max_queue)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.limits = pool, limits or Limits()
    app.add_middleware(Gate, api_key=api_key or None, check_host=check_host, limits=app.state.limits)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=str(exc.status_code)).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(validation_error_body(exc.errors()), status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "workers": len(engines), "queued": pool.queued()}

    names = [model_name] + ([ALIAS] if model_name != ALIAS else [])   # the exact id first: the page shows it

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "nanochat", "root": model_name,
                "max_model_len": context_len}

    def unknown_model(name: str) -> APIError:
        known = " or ".join(f"'{n}'" for n in names)
        return APIError(404, f"The model '{name[:80]}' does not exist: this server has {known} (see /v1/models)",
                        "model", code="model_not_found")

    @app.get("/v1/models")
    async def models_list():
        return {"object": "list", "data": [model_card(n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model_get(name: str):
        if name not in names:
            raise unknown_model(name)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.model is not None and req.model not in names:
            raise unknown_model(req.model)
        conv = [{"role": "system" if m.role == "developer" else m.role,
                 "content": content_to_parts(m.text) if m.role == "assistant" else m.text} for m in req.messages]
        if system_prompt and not (conv and conv[0]["role"] == "system"):
            conv.insert(0, {"role": "system", "content": system_prompt})
        try:
            ids = tokenizer.render_for_completion({"messages": conv})
        except NanochatError as e:
            raise APIError(400, str(e), "messages") from None
        asked = req.requested_max_tokens
        if len(ids) >= context_len or (asked is not None and len(ids) + asked > context_len):
            more = f" and max_tokens asks for {asked} more" if asked is not None else ""
            raise APIError(400, f"the conversation is {len(ids)} tokens{more}; the model's context is {context_len} "
                           "tokens (the sequence length it was trained with): shorten the conversation or lower max_tokens",
                           "max_tokens" if asked is not None and len(ids) < context_len else "messages",
                           code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(DEFAULTS["max_tokens"], context_len - len(ids))
        job = Job(ids, req, max_tokens, asyncio.get_running_loop())
        pool.submit(job)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:   # no caching, and no buffering by a reverse proxy in front of us: tokens go out as made
            return StreamingResponse(_sse(job, rid, now), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(job, rid, now, request)

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def chunk(rid: str, now: int, delta: dict, finish: str | None = None) -> str:
        return event({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                      "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def usage(job: Job, n: int) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}

    async def _sse(job: Job, rid: str, now: int):
        try:
            yield chunk(rid, now, {"role": "assistant", "content": ""})
            try:
                async for kind, value, n in _reply(job):
                    if kind == "text":
                        yield chunk(rid, now, {"content": value})
                    else:
                        finish = value
            except APIError as e:   # the reply is cut: say so, and no finish_reason pretends otherwise
                yield event(e.body())
                return
            yield chunk(rid, now, {}, finish)
            if job.req.include_usage:
                yield event({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                             "choices": [], "usage": usage(job, n)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()   # client gone (or done): stop generating for it

    async def _complete(job: Job, rid: str, now: int, request: Any):
        async def watch():   # the only way to learn that a non-streaming client hung up is to listen for it
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel.set()

        watcher = asyncio.create_task(watch())
        try:
            text, finish, n = [], "length", 0
            async for kind, value, n in _reply(job):
                if kind == "text":
                    text.append(value)
                else:
                    finish = value
        finally:
            watcher.cancel()
            job.cancel.set()
        return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": finish}],
                "usage": usage(job, n)}

    return app


async def _reply(job: Job):
    """The reply as ("text", delta, 0) items - tool calls as [calc ...], stop sequences applied - then one
    ("finish", finish_reason, tokens generated). Raises APIError if generation failed or was aborted."""
    markup, stops, finish, n = ToolText(), StopFilter(job.req.stops), "length", 0
    while (item := await job.out.get()) is not None:
        if isinstance(item, APIError):
            raise item
        if isinstance(item, Exception):
            raise APIError(500, f"generation failed: {item}", code="generation_failed", type="server_error")
        if item.kind == "finish":
            n = item.num_tokens
            finish = "stop" if stops.stopped or item.text == "stop" else "length"
            continue
        if text := stops.feed(markup.feed(item.kind, item.text)):
            yield "text", text, 0
        if stops.stopped:
            job.cancel.set()   # the rest is not wanted; the worker stops at the next token and reports the count
    tail = ("" if stops.stopped else stops.flush()) + markup.close()
    if tail:
        yield "text", tail, 0
    yield "finish", finish, n


def run_server(host: str = "127.0.0.1", port: int = 8000, checkpoint: str | None = None, device: str | None = None,
               api_key: str | None = None, dtype: str = "auto") -> None:
    """Load the checkpoint (the latest local run if None) - one replica per GPU when several - and serve."""


    if not 0 < port < 65536:
        raise NanochatError(f"--port must be between 1 and 65535 (got {port})")
    check_bind(host, api_key)
    resolve_dtype(dtype, "cpu")   # a bad --dtype is a usage error before anything loads
    _check_port_free(host, port)
    path = find_checkpoint(checkpoint)
    device = device or autodetect_device_type()
    devices = [device]
    if device == "cuda" and torch.cuda.device_count() > 1:
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    models, tokenizer, meta = [], None, {}
    for d in devices:
        model, tokenizer, meta = load_model(path, d, dtype=dtype)
        models.append(model)
    ckpt = Path(meta.get("path", path))
    name = f"nanochat-{ckpt.parent.parent.name}-{ckpt.parent.name}"   # run and stage: nanochat-<run>-sft
    app = create_app(models, tokenizer, model_name=name, api_key=api_key, check_host=is_loopback(host),
                     system_prompt=meta.get("system_prompt"))
    key = " (API key required)" if api_key else ""
    print(f"nanochat: serving {meta.get('path', path)} on {', '.join(devices)} ({meta['dtype']} weights, loaded in "
          f"{meta['load_s']:.1f} s) at http://{host}:{port}/{key}", flush=True)
    make_server(app, host, port).run()


def check_bind(host: str, api_key: str | None) -> None:
    """Anything but loopback without a key would give the model (and its GPU bill) to whoever finds the port."""
    if not is_loopback(host) and not api_key:
        raise NanochatError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                            "the model. Set NANOCHAT_API_KEY (or pass --api-key), or listen on 127.0.0.1")


def _check_port_free(host: str, port: int) -> None:
    """uvicorn logs and exits on a busy port; say it in one line before loading a model instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise NanochatError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from None


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m nanochat_core.inference.serve", description="Web chat + OpenAI-compatible API.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; "
                   "anything else needs an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory (default: the latest run)")
    p.add_argument("--device", default=None, help="cuda | cpu | mps (default: auto)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY") or None,
                   help="require `Authorization: Bearer KEY` on /v1/* (default: $NANOCHAT_API_KEY; prefer the "
                        "variable: a command line is visible to every user of the machine)")
    p.add_argument("--dtype", default="auto", help="weights: auto | fp32 | bf16 | int8 | int4 (default auto: int4 on a CPU)")
    a = p.parse_args()
    run_server(a.host, a.port, a.checkpoint, a.device, a.api_key, a.dtype)


if __name__ == "__main__":
    run_main(main)
