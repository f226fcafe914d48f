"""A pool of model workers: threads that each own an engine and run one generation at a time.

Generation is blocking, device-bound work; the web server's event loop must never wait on it.
Each request becomes a job on one shared queue (so requests wait for the first free worker, in
arrival order). The worker thread runs `engine.stream(...)` and hands every token to the
requesting coroutine through that coroutine's asyncio.Queue with `loop.call_soon_threadsafe`,
the only thread-safe way into an event loop. The coroutine side (`Generation`) is an async
iterator of token ids; cancelling it (client disconnect, `cancel()`) sets an Event that the worker
checks before every token, so an abandoned request frees its worker after at most one more token.

Engines are built up front, one per worker, so a model that fails to load fails at startup
rather than on the first request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from typing import Any, Callable, Collection, Iterator, Protocol


class EngineLike(Protocol):
    """The interface of flaxchat.inference.engine.Engine that serving needs."""

    def stream(self, prompt: list[int], *, max_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, use_tools: bool = True) -> Iterator[int]: ...


class GenerationError(RuntimeError):
    """The engine raised while generating; the message carries its error."""


class PoolClosedError(RuntimeError):
    """A request was submitted to a pool that has been shut down."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.6
    top_k: int = 50
    top_p: float = 1.0
    seed: int = 0
    use_tools: bool = True


@dataclasses.dataclass
class _Job:
    prompt: list[int]
    params: SamplingParams
    deliver: Callable[[tuple[str, Any]], None]
    cancelled: threading.Event


class Generation:
    """Async iterator over the token ids of one request; `finish_reason` is set when it ends:
    "stop" (a stop token or the engine ended), "length" (max_tokens) or "cancelled"."""

    def __init__(self, pool: "WorkerPool", prompt: list[int], params: SamplingParams):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False
        self.finish_reason: str | None = None
        self.num_tokens = 0
        pool._submit(_Job(list(prompt), params, self._deliver, self._cancelled))

    def _deliver(self, item: tuple[str, Any]) -> None:
        """Called on the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self._cancelled.set()

    def cancel(self) -> None:
        """Stop generating (idempotent); the worker stops before its next token."""
        if not self._done:
            self._done = True
            self.finish_reason = self.finish_reason or "cancelled"
        self._cancelled.set()

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> int:
        if self._done:
            raise StopAsyncIteration
        try:
            kind, value = await self._queue.get()
        except BaseException:  # CancelledError when the client goes away
            self.cancel()
            raise
        if kind == "token":
            self.num_tokens += 1
            return value
        self._done = True
        self._cancelled.set()
        if kind == "done":
            self.finish_reason = value
            raise StopAsyncIteration
        raise GenerationError(value)


class WorkerPool:
    """`num_workers` threads, each with its own engine from `engine_factory()`."""

    def __init__(self, engine_factory: Callable[[], EngineLike], num_workers: int = 1, *,
                 stop_tokens: Collection[int] = ()):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._busy = 0
        self._served = 0
        self._tokens = 0
        self._cancelled = 0
        self._errors = 0
        self._closed = False
        engines = [engine_factory() for _ in range(num_workers)]
        self._threads = [threading.Thread(target=self._work, args=(engine,), name=f"flaxchat-worker-{i}",
                                          daemon=True) for i, engine in enumerate(engines)]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ requests
    def generate(self, prompt: list[int], params: SamplingParams) -> Generation:
        """Queue a generation; iterate the result (inside the event loop) for its token ids."""
        return Generation(self, prompt, params)

    def _submit(self, job: _Job) -> None:
        if self._closed:
            raise PoolClosedError("the worker pool has been shut down; restart the server")
        self._jobs.put(job)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"workers_total": self.num_workers, "workers_busy": self._busy,
                    "queued": self._jobs.qsize(), "requests_served": self._served,
                    "requests_cancelled": self._cancelled, "requests_failed": self._errors,
                    "tokens_generated": self._tokens}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers after their current job; queued jobs are dropped as cancelled."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancelled.set()
                job.deliver(("done", "cancelled"))
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)

    # ------------------------------------------------------------------- workers
    def _work(self, engine: EngineLike) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it was queued
                with self._lock:
                    self._cancelled += 1
                continue
            with self._lock:
                self._busy += 1
            self._run(engine, job)

    def _run(self, engine: EngineLike, job: _Job) -> None:
        produced, outcome, final = 0, "stop", None
        p = job.params
        tokens = None
        try:
            tokens = engine.stream(job.prompt, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                                   top_p=p.top_p, seed=p.seed, use_tools=p.use_tools)
            for token in tokens:
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
                token = int(token)
                if token in self.stop_tokens:
                    break
                produced += 1
                job.deliver(("token", token))
                if produced >= p.max_tokens:
                    outcome = "length"
                    break
            if job.cancelled.is_set():
                outcome = "cancelled"
            final = ("done", outcome)
        except Exception as exc:  # report to the client; the worker itself lives on
            outcome = "error"
            final = ("error", f"generation failed: {type(exc).__name__}: {exc}")
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                try:
                    close()  # release the engine's generator (and its cache) now, not at GC time
                except Exception:
                    pass
            with self._lock:
                self._busy -= 1
                self._tokens += produced
                if outcome == "cancelled":
                    self._cancelled += 1
                elif outcome == "error":
                    self._errors += 1
                else:
                    self._served += 1
            # the last event goes out after the accounting, so a client that has seen its request
            # end never reads /stats from before it (it did: requests_failed 0, workers_busy 1)
            if final is not None:
                job.deliver(final)


class ScriptedEngine:
    """A stand-in engine that streams a fixed reply, `delay` seconds per token, then
    <|assistant_end|>: for UI work without a model (`server --demo`) and for tests.
    `calls` records each (prompt, sampling kwargs); `yielded` counts tokens handed out."""

    def __init__(self, tokenizer: Any, reply: str, delay: float = 0.0):
        self.reply_ids = list(tokenizer.encode(reply)) + [tokenizer.encode_special("<|assistant_end|>")]
        self.delay = delay
        self.calls: list[tuple[list[int], dict[str, Any]]] = []
        self.yielded = 0

    def stream(self, prompt: list[int], *, max_tokens: int = 256, **sampling: Any) -> Iterator[int]:
        import time

        self.calls.append((list(prompt), {"max_tokens": max_tokens, **sampling}))
        for token in self.reply_ids[:max_tokens]:
            if self.delay:
                time.sleep(self.delay)
            self.yielded += 1
            yield token
