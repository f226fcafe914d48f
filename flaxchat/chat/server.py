"""The chat web app: a FastAPI app that streams replies token by token as Server-Sent Events.

    GET  /                  the chat page (static/index.html)
    POST /chat/completions  {"messages": [...], "temperature", "top_k", "max_tokens", "top_p", "seed"}
                            -> text/event-stream: `data: {"token": "..."}` per decoded piece, then
                               `data: {"done": true, "finish_reason": ..., "tokens": n}` (or
                               `data: {"error": "..."}` if the engine fails mid-reply)
    GET  /health            {"status": "ok", ...}
    GET  /stats             worker pool counters (busy/total, queued, served, tokens)

Generation runs on a WorkerPool (flaxchat.chat.workers): the event loop only awaits tokens, so
it keeps serving /health and new connections while every worker is busy. Requests are checked
against nanochat's limits before they reach a worker; every rejection is a 400 JSON body
`{"error": "...", "field": "..."}` naming the offending field.

    python -m flaxchat.chat.server --model /path/to/pretrain/output --workers 2 --port 8000
"""

from __future__ import annotations

import argparse
import json
import math
import random
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from flaxchat.chat import TextStreamer, stop_token_ids
from flaxchat.chat.workers import EngineLike, GenerationError, PoolClosedError, SamplingParams, WorkerPool

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)
MAX_TOKENS_RANGE = (1, 4096)
ROLES = ("user", "assistant")
STATIC_DIR = Path(__file__).parent / "static"


class RequestError(ValueError):
    """A chat request that breaks a limit; `field` names the offending part of the body."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _number(body: dict[str, Any], field: str, default: float, lo: float, hi: float, integer: bool) -> Any:
    value = body.get(field, default)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(field, f"{field} must be {kind} in [{lo}, {hi}], got {json.dumps(value)[:40]}")
    if not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(field, f"{field} must be in [{lo}, {hi}], got {value}")
    return int(value) if integer else float(value)


def parse_chat_request(raw: bytes, defaults: SamplingParams) -> tuple[list[dict[str, str]], SamplingParams]:
    """Validate a /chat/completions body -> (messages, sampling params); raises RequestError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("body", f"request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("body", f"request body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"too many messages: {len(messages)} > {MAX_MESSAGES}; start a new chat")
    total = 0
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role",
                               f"messages[{i}].role must be one of {list(ROLES)}, got {json.dumps(role)[:40]}")
        expected = ROLES[i % 2]
        if role != expected:
            raise RequestError(f"messages[{i}].role", f"messages[{i}].role must be {expected!r}: messages "
                               f"alternate user/assistant starting with user")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content", f"messages[{i}].content must be a string")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(f"messages[{i}].content", f"messages[{i}].content is {len(content)} characters; "
                               f"the limit is {MAX_MESSAGE_CHARS}")
        total += len(content)
        clean.append({"role": role, "content": content})
    if total > MAX_TOTAL_CHARS:
        raise RequestError("messages", f"conversation is {total} characters; the limit is {MAX_TOTAL_CHARS} "
                           f"(start a new chat)")
    if clean[-1]["role"] != "user":
        raise RequestError("messages", "the last message must be from the user (drop the assistant reply "
                           "to regenerate it)")
    params = SamplingParams(
        temperature=_number(body, "temperature", defaults.temperature, *TEMPERATURE_RANGE, integer=False),
        top_k=_number(body, "top_k", defaults.top_k, *TOP_K_RANGE, integer=True),
        max_tokens=_number(body, "max_tokens", defaults.max_tokens, *MAX_TOKENS_RANGE, integer=True),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, integer=False),
        # no seed given: a fresh one, so "regenerate" gives a different reply at temperature > 0
        seed=_number(body, "seed", random.randrange(2**31), 0, 2**31 - 1, integer=True),
        use_tools=defaults.use_tools)
    if params.top_p <= 0.0:
        raise RequestError("top_p", "top_p must be in (0, 1]")
    return clean, params


def _error(status: int, field: str, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


def create_app(engines: WorkerPool | Callable[[], EngineLike], tokenizer: Any, *, num_workers: int = 1,
               context_len: int | None = None, defaults: SamplingParams = SamplingParams()) -> FastAPI:
    """The chat app. `engines` is a WorkerPool, or an engine factory from which a pool of
    `num_workers` is built (and closed on shutdown). `context_len` rejects prompts that do not
    leave room for a reply. `tokenizer` needs render_for_completion, decode and encode_special."""
    stops = stop_token_ids(tokenizer)
    if isinstance(engines, WorkerPool):
        pool, owns_pool = engines, False
    else:
        pool, owns_pool = WorkerPool(engines, num_workers, stop_tokens=stops), True
    pool_stops = pool.stop_tokens or stops
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_pool:
            pool.close()

    app = FastAPI(title="flaxchat", lifespan=lifespan)
    app.state.pool = pool

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = pool.stats()
        return {"status": "ok", "workers_total": stats["workers_total"], "workers_busy": stats["workers_busy"]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return pool.stats()

    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            messages, params = parse_chat_request(await request.body(), defaults)
            prompt = tokenizer.render_for_completion(
                {"messages": [*messages, {"role": "assistant", "content": ""}]})
        except RequestError as exc:
            return _error(400, exc.field, str(exc))
        except ValueError as exc:  # rendering refused the conversation
            return _error(400, "messages", str(exc))
        if context_len is not None and len(prompt) >= context_len:
            return _error(400, "messages", f"conversation is {len(prompt)} tokens; the model's context is "
                          f"{context_len} tokens: start a new chat")
        try:
            generation = pool.generate(prompt, params)
        except PoolClosedError as exc:
            return _error(503, "server", str(exc))

        async def events() -> AsyncIterator[bytes]:
            streamer = TextStreamer(tokenizer)
            try:
                async for token in generation:
                    if token in pool_stops:  # a pool shared with other stop rules: still end the turn
                        break
                    text = streamer.push(token)
                    if text:
                        yield _sse({"token": text})
                tail = streamer.flush()
                if tail:
                    yield _sse({"token": tail})
                yield _sse({"done": True, "finish_reason": generation.finish_reason or "stop",
                            "tokens": generation.num_tokens})
            except GenerationError as exc:
                yield _sse({"error": str(exc)})
            finally:
                generation.cancel()  # client gone or stream finished: free the worker

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class ServerThread:
    """Run an app under uvicorn on a background thread (tests, notebooks):

        with ServerThread(app) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **uvicorn_options: Any):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", **uvicorn_options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="flaxchat-uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "ServerThread":
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.host}:{self.port}; is the port free?")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flaxchat.chat.server", description="Serve a chat web UI.")
    parser.add_argument("--model", help="a stage output uri or its manifest.json")
    parser.add_argument("--demo", action="store_true",
                        help="no model: a byte-level tokenizer and a scripted reply (to try the UI)")
    parser.add_argument("--workers", type=int, default=1, help="model workers (concurrent generations)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--temperature", type=float, default=0.6, help="default when a request gives none")
    parser.add_argument("--top-k", type=int, default=50, help="default when a request gives none")
    parser.add_argument("--max-tokens", type=int, default=512, help="default when a request gives none")
    args = parser.parse_args(argv)

    import uvicorn

    if args.demo:
        from flaxchat.chat.workers import ScriptedEngine
        from flaxchat.tokenizer import Tokenizer

        tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
        reply = "This is flaxchat's demo engine: no model is loaded. Ünïcödé and emoji 🚀 stream fine."
        app = create_app(lambda: ScriptedEngine(tokenizer, reply, delay=0.03), tokenizer, num_workers=args.workers)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        return 0
    if not args.model:
        parser.error("--model is required (or --demo)")
    from flaxchat.chat.loading import LoadError, load_chat_model
    try:
        loaded = load_chat_model(args.model)
    except (LoadError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    from flaxchat.inference.engine import Engine

    context = loaded.config.model.sequence_len
    app = create_app(lambda: Engine(loaded.model, loaded.tokenizer, max_len=context), loaded.tokenizer,
                     num_workers=args.workers, context_len=context,
                     defaults=SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                             top_k=args.top_k))
    print(f"flaxchat: serving {args.model} on http://{args.host}:{args.port} with {args.workers} worker(s)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
