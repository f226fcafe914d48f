"""Chat web API, CLI and model loading: streaming order/content, UTF-8 safety, limits, errors,
real streaming (first event before generation ends), disconnects, and one real-model run."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time

import httpx
import pytest

from flaxchat.chat import REPLACEMENT, TextStreamer
from flaxchat.chat.server import ServerThread, create_app, parse_chat_request
from flaxchat.chat.workers import SamplingParams, ScriptedEngine, WorkerPool
from flaxchat.tokenizer import Tokenizer

REPLY = "Héllo wörld 😀 — ok"     # 2-, 3- and 4-byte characters, split across byte tokens
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})   # byte-level: every byte its own token


def sse_events(body: str) -> list[dict]:
    frames = [f for f in body.split("\n\n") if f.strip()]
    assert all(f.startswith("data: ") for f in frames), frames
    return [json.loads(f[len("data: "):]) for f in frames]


def post(app, payload, raw: bytes | None = None) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if raw is not None:
                return await client.post("/chat/completions", content=raw,
                                         headers={"content-type": "application/json"})
            return await client.post("/chat/completions", json=payload)
    return asyncio.run(go())


def get(app, path: str) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path)
    return asyncio.run(go())


class GatedEngine(ScriptedEngine):
    """Yields one token, then waits for `gate` before the rest."""

    def __init__(self, tokenizer, reply):
        super().__init__(tokenizer, reply)
        self.gate = threading.Event()

    def stream(self, prompt, **kw):
        for i, token in enumerate(super().stream(prompt, **kw)):
            if i == 1:
                self.gate.wait(20)
            yield token

    @property
    def finished(self) -> bool:
        return self.yielded == len(self.reply_ids)


class FailingEngine:
    def stream(self, prompt, **kw):
        yield 65
        raise RuntimeError("device on fire")


# ------------------------------------------------------------------------ decoding
def test_text_streamer_holds_back_split_characters(tokenizer):
    streamer = TextStreamer(tokenizer)
    deltas = [streamer.push(t) for t in REPLY.encode("utf-8")] + [streamer.flush()]
    assert "".join(deltas) == REPLY
    assert not any(REPLACEMENT in d for d in deltas)
    emoji = REPLY.index("😀")
    start = len(REPLY[:emoji].encode("utf-8"))
    assert deltas[start:start + 4] == ["", "", "", "😀"]      # 4 bytes -> held back 3 times


def test_text_streamer_flushes_an_incomplete_tail(tokenizer):
    streamer = TextStreamer(tokenizer)
    assert streamer.push(ord("a")) == "a"
    assert streamer.push(0xE2) == ""                            # first byte of a 3-byte character
    assert streamer.flush() == REPLACEMENT


# ----------------------------------------------------------------------- endpoints
def test_page_health_and_stats(tokenizer):
    app = create_app(lambda: ScriptedEngine(tokenizer, REPLY), tokenizer, num_workers=2)
    page = get(app, "/")
    assert page.status_code == 200 and "/chat/completions" in page.text and "Regenerate" in page.text
    assert get(app, "/health").json()["status"] == "ok"
    before = get(app, "/stats").json()
    assert before["workers_total"] == 2 and before["workers_busy"] == 0 and before["requests_served"] == 0
    assert post(app, {"messages": USER}).status_code == 200
    after = get(app, "/stats").json()
    assert after["requests_served"] == 1
    assert after["tokens_generated"] == len(REPLY.encode("utf-8"))   # assistant_end is not counted
    assert after["workers_busy"] == 0


def test_stream_order_content_and_utf8(tokenizer):
    engine = ScriptedEngine(tokenizer, REPLY)
    app = create_app(WorkerPool(lambda: engine, 1, stop_tokens=[tokenizer.encode_special("<|assistant_end|>")]),
                     tokenizer)
    response = post(app, {"messages": USER, "temperature": 0.3, "top_k": 7, "max_tokens": 100})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    tokens = [e["token"] for e in events[:-1]]
    assert tokens == list(REPLY)                    # one event per complete character, in order
    assert events[-1] == {"done": True, "finish_reason": "stop", "tokens": len(REPLY.encode("utf-8"))}
    prompt, sampling = engine.calls[0]
    assert prompt == tokenizer.render_for_completion({"messages": USER + [{"role": "assistant", "content": ""}]})
    assert sampling["temperature"] == 0.3 and sampling["top_k"] == 7 and sampling["max_tokens"] == 100


def test_max_tokens_ends_with_length(tokenizer):
    app = create_app(lambda: ScriptedEngine(tokenizer, "abcdefgh"), tokenizer)
    events = sse_events(post(app, {"messages": USER, "max_tokens": 3}).text)
    assert "".join(e.get("token", "") for e in events) == "abc"
    assert events[-1]["finish_reason"] == "length"


def test_multi_turn_conversation_is_rendered(tokenizer):
    engine = ScriptedEngine(tokenizer, "ok")
    app = create_app(lambda: engine, tokenizer)
    convo = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    assert post(app, {"messages": convo}).status_code == 200
    expected = tokenizer.render_for_completion({"messages": convo + [{"role": "assistant", "content": ""}]})
    assert engine.calls[0][0] == expected


LIMIT_CASES = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] * 250
      + [{"role": "user", "content": "z"}]}, "messages"),                                   # 501 messages
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "x" * 8000}] * 2
      + [{"role": "user", "content": "x"}]}, "messages"),                                   # 32001 chars total
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": ["hello"]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_k": 201}, "top_k"),
    ({"messages": USER, "top_k": -1}, "top_k"),
    ({"messages": USER, "top_k": 1.5}, "top_k"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 4097}, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "top_p": 0}, "top_p"),
]


@pytest.mark.parametrize("payload,field", LIMIT_CASES)
def test_limits_are_rejected_naming_the_field(tokenizer, payload, field):
    engine = ScriptedEngine(tokenizer, "never")
    app = create_app(lambda: engine, tokenizer)
    response = post(app, payload)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["field"] == field and body["error"]
    assert engine.calls == []                                   # nothing reached a worker


def test_limits_at_the_boundary_are_accepted(tokenizer):
    long_ok = [{"role": "user", "content": "x" * 8000}, {"role": "assistant", "content": "x" * 8000}] * 2
    messages, params = parse_chat_request(json.dumps({
        "messages": long_ok[:3], "temperature": 2, "top_k": 200, "max_tokens": 4096}).encode(), SamplingParams())
    assert len(messages) == 3 and params.temperature == 2.0 and params.top_k == 200 and params.max_tokens == 4096


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'"text"', b"null"])
def test_malformed_json_is_a_4xx_and_the_server_lives(tokenizer, raw):
    app = create_app(lambda: ScriptedEngine(tokenizer, "fine"), tokenizer)
    response = post(app, None, raw=raw)
    assert response.status_code == 400 and response.json()["field"] == "body"
    assert get(app, "/health").json()["status"] == "ok"
    events = sse_events(post(app, {"messages": USER}).text)
    assert "".join(e.get("token", "") for e in events) == "fine"


def test_engine_error_becomes_an_error_event(tokenizer):
    app = create_app(lambda: FailingEngine(), tokenizer)
    events = sse_events(post(app, {"messages": USER}).text)
    assert events[0] == {"token": "A"}
    assert "device on fire" in events[-1]["error"]
    stats = get(app, "/stats").json()
    assert stats["requests_failed"] == 1 and stats["workers_busy"] == 0


# ------------------------------------------------------------- real HTTP streaming
def test_first_event_arrives_before_generation_finishes(tokenizer):
    engine = GatedEngine(tokenizer, "streaming!")
    app = create_app(lambda: engine, tokenizer)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/chat/completions", json={"messages": USER}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert json.loads(first[len("data: "):]) == {"token": "s"}
            assert not engine.finished          # the engine is still generating
            # the event loop is free while the only worker is busy
            assert client.get("/health").json()["workers_busy"] == 1
            engine.gate.set()
            rest = [json.loads(line[len("data: "):]) for line in lines if line]
        assert "s" + "".join(e.get("token", "") for e in rest) == "streaming!"
        assert rest[-1]["done"] is True and engine.finished


def test_client_disconnect_frees_the_worker(tokenizer):
    engine = ScriptedEngine(tokenizer, "x" * 2000, delay=0.005)       # ~10 s if never stopped
    app = create_app(lambda: engine, tokenizer, num_workers=1)
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/chat/completions", json={"messages": USER, "max_tokens": 4096}) as response:
            next(line for line in response.iter_lines() if line)
        deadline = time.monotonic() + 20
        while client.get("/stats").json()["workers_busy"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = client.get("/stats").json()
        assert stats["workers_busy"] == 0 and stats["requests_cancelled"] == 1
        assert engine.yielded < len(engine.reply_ids)                 # generation stopped early
        engine.delay = 0.0
        events = sse_events(client.post("/chat/completions", json={"messages": USER, "max_tokens": 5}).text)
        assert "".join(e.get("token", "") for e in events) == "xxxxx"  # the freed worker serves again


def test_bad_http_frames_get_errors_and_the_server_lives(tokenizer):
    import socket

    app = create_app(lambda: ScriptedEngine(tokenizer, "alive"), tokenizer)
    with ServerThread(app) as server:
        def raw(data: bytes, half_close: bool = False) -> bytes:
            with socket.create_connection((server.host, server.port), timeout=10) as sock:
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

        assert raw(b"NOT HTTP AT ALL\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert raw(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"
                   ).startswith(b"HTTP/1.1 400")
        # a body cut short by the client: nothing to answer, but nothing may break either
        raw(b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 500\r\n\r\n{\"messages\": [", half_close=True)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            assert client.get("/health").json()["status"] == "ok"
            events = sse_events(client.post("/chat/completions", json={"messages": USER}).text)
            assert "".join(e.get("token", "") for e in events) == "alive"
            assert client.get("/stats").json()["workers_busy"] == 0


# ----------------------------------------------------------------------------- CLI
def test_cli_streams_and_keeps_history(tokenizer):
    from steps.chat import chat_loop

    engine = ScriptedEngine(tokenizer, REPLY)
    lines = iter(["hello", "again", "/clear", "fresh", "/quit"])
    out = io.StringIO()
    convo = chat_loop(engine, tokenizer, lambda _prompt: next(lines), out, temperature=0.0)
    assert out.getvalue().count(REPLY) == 3 and REPLACEMENT not in out.getvalue()
    assert "cleared" in out.getvalue()
    second_prompt = engine.calls[1][0]
    assert second_prompt == tokenizer.render_for_completion({"messages": [
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": REPLY},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": ""}]})
    third_prompt = engine.calls[2][0]                                 # after /clear: history is gone
    assert third_prompt == tokenizer.render_for_completion({"messages": [
        {"role": "user", "content": "fresh"}, {"role": "assistant", "content": ""}]})
    assert convo == [{"role": "user", "content": "fresh"}, {"role": "assistant", "content": REPLY}]


# ------------------------------------------------------------------- model loading
@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, tokenizer):
    """A pretrain-like stage output: orbax checkpoint {model, optimizer}, tokenizer, manifest."""
    import optax
    from flax import nnx

    from flaxchat import storage
    from flaxchat.checkpoint import CheckpointStore
    from flaxchat.config import ModelConfig, PipelineConfig
    from flaxchat.manifest import build_manifest, write_manifest
    from flaxchat.model.gpt import GPT
    from flaxchat.train.loop import checkpoint_state

    root = tmp_path_factory.mktemp("stage") / "pretrain"
    config = PipelineConfig()
    config.model = ModelConfig(depth=2, aspect_ratio=32, head_dim=32, sequence_len=64,
                               vocab_size=tokenizer.vocab_size, window_pattern="L")
    config.model.derive()
    model = GPT(config.model, rngs=nnx.Rngs(3))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    store = CheckpointStore(str(root / "checkpoints"))
    store.save(7, checkpoint_state(model, optimizer), {"loader": None})
    store.close()
    tokenizer.save(root / "tokenizer")
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(root))] = storage.sha256_file(str(path))
    write_manifest(build_manifest("pretrain", str(root), {}, config.to_dict(), files,
                                  checkpoint={"dir": str(root / "checkpoints"), "step": 7}))
    return root, model


def test_load_chat_model_restores_the_trained_params(stage_dir, tokenizer):
    from flaxchat.chat.loading import load_chat_model
    from flaxchat.checkpoint import tree_digest

    root, model = stage_dir
    for source in (str(root), str(root / "manifest.json")):
        loaded = load_chat_model(source)
        assert loaded.step == 7 and loaded.tokenizer.vocab_size == tokenizer.vocab_size
        assert tree_digest(loaded.model.param_tree()) == tree_digest(model.param_tree())


def test_load_chat_model_from_a_moved_directory(stage_dir, tmp_path):
    import shutil

    from flaxchat.chat.loading import load_chat_model
    from flaxchat.checkpoint import tree_digest

    root, model = stage_dir
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    original_manifest = (root / "manifest.json").read_text()
    (root / "manifest.json").rename(root / "manifest.json.bak")     # the original uri is gone as a stage
    try:
        shutil.move(str(root / "checkpoints"), str(tmp_path / "elsewhere"))
        try:
            loaded = load_chat_model(str(moved))
        finally:
            shutil.move(str(tmp_path / "elsewhere"), str(root / "checkpoints"))
    finally:
        (root / "manifest.json.bak").rename(root / "manifest.json")
    assert (root / "manifest.json").read_text() == original_manifest
    assert tree_digest(loaded.model.param_tree()) == tree_digest(model.param_tree())


def test_load_chat_model_errors(stage_dir, tmp_path):
    import shutil

    from flaxchat.chat.loading import load_chat_model
    from flaxchat.manifest import ManifestError

    with pytest.raises(ManifestError, match="manifest.json"):
        load_chat_model(str(tmp_path / "nothing-here"))
    root, _ = stage_dir
    tampered = tmp_path / "tampered"
    shutil.copytree(root, tampered)
    rank_file = tampered / "tokenizer" / "tokenizer.tiktoken"
    rank_file.write_bytes(rank_file.read_bytes() + b"\n")
    import json as _json
    manifest = _json.loads((tampered / "manifest.json").read_text())
    manifest["uri"] = str(tampered)
    manifest["checkpoint"]["dir"] = str(tampered / "checkpoints")
    (tampered / "manifest.json").write_text(_json.dumps(manifest))
    with pytest.raises(ManifestError, match="checksum"):
        load_chat_model(str(tampered))


def test_real_engine_streams_through_the_app(stage_dir):
    """The real Engine + a tiny random GPT behind the app: the SSE text equals a direct decode."""
    try:
        from flaxchat.inference.engine import Engine
    except Exception as exc:  # noqa: BLE001 - any import failure means the engine is not usable yet
        pytest.skip(f"flaxchat.inference.engine is not importable ({type(exc).__name__}: {exc})")
    from flaxchat.chat import stop_token_ids
    from flaxchat.chat.loading import load_chat_model

    root, _ = stage_dir
    loaded = load_chat_model(str(root))
    engine = Engine(loaded.model, loaded.tokenizer, max_len=64)
    tok = loaded.tokenizer
    stops = stop_token_ids(tok)
    prompt = tok.render_for_completion({"messages": USER + [{"role": "assistant", "content": ""}]})
    direct = []
    for token in engine.stream(prompt, max_tokens=12, temperature=0.0, seed=0, use_tools=False):
        if token in stops:
            break
        direct.append(token)
    app = create_app(lambda: engine, tok, context_len=64,
                     defaults=SamplingParams(max_tokens=12, temperature=0.0, use_tools=False))
    events = sse_events(post(app, {"messages": USER, "temperature": 0.0, "max_tokens": 12}).text)
    assert events[-1]["done"] is True and events[-1]["tokens"] == len(direct)
    assert "".join(e.get("token", "") for e in events[:-1]) == tok.decode(direct)
    too_long = [{"role": "user", "content": "x" * 100}]
    response = post(app, {"messages": too_long})
    assert response.status_code == 400 and "context" in response.json()["error"]


def test_cli_one_shot_loads_the_model_and_streams(stage_dir, capsys):
    from steps.chat import main

    root, _ = stage_dir
    engines = []

    def factory(model, tokenizer, max_len, draft=None):
        engines.append((ScriptedEngine(tokenizer, REPLY), model, max_len))
        return engines[-1][0]

    assert main(["--model", str(root), "-p", "Bonjour", "-t", "0.2", "-k", "9"], engine_factory=factory) == 0
    assert capsys.readouterr().out == REPLY + "\n"
    engine, model, max_len = engines[0]
    assert max_len == 64 and model.spec.vocab_size == 265
    assert engine.calls[0][1]["temperature"] == 0.2 and engine.calls[0][1]["top_k"] == 9
    assert main(["--model", str(root), "-p", "x", "-t", "3"], engine_factory=factory) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["--model", str(root / "missing"), "-p", "x"], engine_factory=factory) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_cli_speculative_with_a_draft_prints_the_same_reply(stage_dir, capsys):
    """--draft (here the model itself) decodes speculatively through Engine.stream: under greedy
    sampling the reply is exactly the plain one; a bad --spec-k is a clear error."""
    from steps.chat import main

    root, _ = stage_dir
    args = ["--model", str(root), "-p", "Bonjour", "-t", "0", "--max-tokens", "12", "--no-tools"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--draft", str(root), "--spec-k", "3"]) == 0
    assert capsys.readouterr().out == plain and len(plain) > 1
    assert main(args + ["--draft", str(root), "--spec-k", "0"]) == 2
    assert "--spec-k" in capsys.readouterr().err
