"""Serve a run's cards with `python flows/full_pipeline.py card server` and screenshot them in headless
Chromium (the Debian `chromium` package driven by playwright; its own browser download is never used).

`screenshot_cards` returns, per card id, the text the page shows, how many rendered charts and table
rows it has, and the screenshot path, so a test can check that a browsing user sees the stage's
content, not only that the card's data exists.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def browser_missing() -> str | None:
    """Why the browser check cannot run here, or None."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} not installed (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runinfo(url: str, deadline: float, server: subprocess.Popen) -> dict:
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"card server exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/runinfo/", timeout=5) as resp:
                return json.loads(resp.read())
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"card server at {url} did not answer") from None
            time.sleep(0.5)


def screenshot_cards(flow_file: str, run_id: str, env: dict, cwd: str, out_dir: Path) -> dict[str, dict]:
    from playwright.sync_api import sync_playwright
    port = _free_port()
    server = subprocess.Popen([sys.executable, flow_file, "card", "server", "--run-id", run_id, "--port", str(port),
                               "--poll-interval", "1"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    shown: dict[str, dict] = {}
    try:
        info = _runinfo(url, time.time() + 120, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 900})
                for card in info["cards"]:
                    card_id = card["card_object"]["id"]
                    page.goto(f"{url}/card/{card['card']}")
                    page.wait_for_selector("table, canvas, svg", timeout=30_000)
                    page.wait_for_timeout(500)            # let vega finish drawing
                    shot = out_dir / f"{card_id}.png"
                    page.screenshot(path=str(shot), full_page=True)
                    shown[card_id] = {"text": page.inner_text("body"), "charts": page.locator(".vega-embed").count(),
                                      "rows": page.locator("table tr").count(), "screenshot": shot}
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(30)
    return shown
