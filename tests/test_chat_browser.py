"""End to end in headless Chromium: type a message in the chat page, send it, and watch the reply
stream in: a partial reply is on screen while the engine is paused mid-reply, then the full text.

Needs the Debian packages `chromium` (and the `playwright` Python package, which drives it; its
own browser download is never used). Skipped with the reason when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import threading

import pytest

from flaxchat.chat.server import ServerThread, create_app
from flaxchat.chat.workers import ScriptedEngine
from flaxchat.tokenizer import Tokenizer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
REPLY = "Bonjour, ça va? 🚀 Très bien."
PAUSE_AFTER = len("Bonjour, ".encode("utf-8"))

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not installed (apt-get install -y chromium)")


class PausingEngine(ScriptedEngine):
    """Streams PAUSE_AFTER tokens, signals `paused`, and waits for `resume` before the rest."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, REPLY)
        self.paused, self.resume = threading.Event(), threading.Event()

    def stream(self, prompt, **kw):
        for i, token in enumerate(super().stream(prompt, **kw)):
            if i == PAUSE_AFTER:
                self.paused.set()
                self.resume.wait(30)
            yield token


def test_page_streams_a_reply_incrementally():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    tokenizer = Tokenizer({bytes([i]): i for i in range(256)})
    engine = PausingEngine(tokenizer)
    app = create_app(lambda: engine, tokenizer)
    with ServerThread(app) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#input", "Comment ça va?")
            page.click("#send")
            assert engine.paused.wait(30), "the engine never received the request"
            reply = page.locator(".msg.assistant")
            # partial state: the text before the pause is shown while the reply is still streaming
            sync_api.expect(reply).to_have_text("Bonjour,", timeout=15_000)
            assert "streaming" in (reply.get_attribute("class") or "")
            assert page.locator(".msg.user").inner_text() == "Comment ça va?"
            engine.resume.set()
            sync_api.expect(page.locator(".msg.assistant.done")).to_have_text(REPLY, timeout=15_000)
            assert page.locator("#send").is_enabled() and page.locator("#regenerate").is_enabled()
            # regenerate replaces the last reply with a fresh one from the same conversation
            engine.paused.clear()
            page.click("#regenerate")
            assert engine.paused.wait(30)
            sync_api.expect(page.locator(".msg.assistant.done")).to_have_count(1, timeout=15_000)
            sync_api.expect(page.locator(".msg.assistant.done")).to_have_text(REPLY, timeout=15_000)
            assert len(engine.calls) == 2 and engine.calls[0][0] == engine.calls[1][0]
            # new chat clears the log
            page.click("#new_chat")
            sync_api.expect(page.locator(".msg")).to_have_count(0, timeout=5_000)
        finally:
            browser.close()
