"""Load test of the chat server over real HTTP: 50 concurrent streaming clients against uvicorn
with 4 model workers (a scripted engine); every client must get the full reply, none may error,
and the server must still be healthy afterwards. Bounded by a timeout, never by a timed assert."""

from __future__ import annotations

import asyncio
import json

import httpx

from flaxchat.chat.server import ServerThread, create_app
from flaxchat.chat.workers import ScriptedEngine
from flaxchat.tokenizer import Tokenizer

CLIENTS = 50
WORKERS = 4
REPLY = "Load test reply: ünïcødé ✓ and 🚀, streamed byte by byte."


async def one_client(client: httpx.AsyncClient, index: int) -> tuple[str, dict]:
    payload = {"messages": [{"role": "user", "content": f"client {index}"}], "temperature": 0.5}
    text, last = [], {}
    async with client.stream("POST", "/chat/completions", json=payload) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            event = json.loads(line[len("data: "):])
            assert "error" not in event, event
            text.append(event.get("token", ""))
            last = event
    return "".join(text), last


async def run_clients(url: str) -> list[tuple[str, dict]]:
    limits = httpx.Limits(max_connections=CLIENTS + 5)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*(one_client(client, i) for i in range(CLIENTS))), 120)


def test_fifty_concurrent_streams_on_four_workers():
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    engines: list[ScriptedEngine] = []

    def factory() -> ScriptedEngine:
        engines.append(ScriptedEngine(tokenizer, REPLY, delay=0.001))
        return engines[-1]

    app = create_app(factory, tokenizer, num_workers=WORKERS)
    with ServerThread(app) as server:
        results = asyncio.run(run_clients(server.url))
        assert len(results) == CLIENTS
        for text, last in results:
            assert text == REPLY
            assert last == {"done": True, "finish_reason": "stop", "tokens": len(REPLY.encode("utf-8"))}
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/health").json()["status"] == "ok"
            stats = client.get("/stats").json()
    assert stats["requests_served"] == CLIENTS and stats["requests_failed"] == 0
    assert stats["workers_busy"] == 0 and stats["workers_total"] == WORKERS
    assert stats["tokens_generated"] == CLIENTS * len(REPLY.encode("utf-8"))
    # the requests were spread over the pool, each engine serving only its own thread
    assert len(engines) == WORKERS and sum(len(e.calls) for e in engines) == CLIENTS
    assert sum(1 for e in engines if e.calls) > 1
