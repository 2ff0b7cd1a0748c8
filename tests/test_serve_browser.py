"""The playground in headless Chromium (Debian's /usr/bin/chromium driven by playwright; no browser download).

Load the page, send a message, see the canvas drawn from draft events, then the final text and its stats; a
screenshot is saved for a human look (DGEMMA_SCREENSHOT_DIR, default the test's tmp dir). Skipped, with the reason,
only when no Chromium binary can be found; `make test` installs Debian's chromium when it is missing.
"""

import os
import shutil
from pathlib import Path

import pytest
from test_serve import live_server

CHROMIUM = os.environ.get("DGEMMA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


@pytest.fixture(scope="module")
def url():
    from dgemma.api import LLM

    with live_server(LLM(None, device="cpu"), max_model_len=512) as (base, _):
        yield base


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        yield page
        browser.close()


def test_playground_chat_shows_drafts_then_the_answer(url, page, tmp_path):
    shots = Path(os.environ.get("DGEMMA_SCREENSHOT_DIR") or tmp_path)
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('default')")
    page.fill("#max_tokens", "192")  # three canvases of 64: time to watch them come into focus
    page.fill("#seed", "4")
    page.fill("#confidence_threshold", "0.000001")  # no early stop: every canvas runs its 48 steps
    page.fill("#prompt", "Tell me something about love.")
    page.press("#prompt", "Enter")
    # mid-answer: the live canvas, with settled (bright) and noisy (dim) tokens
    page.wait_for_selector(".canvas-view:not([hidden]) .draft-canvas span.settled", timeout=60_000)
    page.screenshot(path=str(shots / "playground_drafting.png"))
    answer = page.wait_for_selector(".turn.assistant[data-finished]", timeout=120_000)
    assert answer.get_attribute("data-finished") in ("stop", "length")
    drafts = page.evaluate("window.dgemma.drafts")
    assert drafts >= 10, drafts  # one event per denoising step
    text = answer.query_selector(".content").inner_text()
    stats = answer.query_selector(".stats").inner_text()
    assert text.strip() and "error" not in text
    assert "steps/canvas" in stats and "tokens/forward" in stats and "tok/s" in stats, stats
    assert page.query_selector(".turn.user").inner_text() == "Tell me something about love."
    page.screenshot(path=str(shots / "playground_answer.png"))
    # a second turn goes out with the history and reuses the cached prefix
    page.fill("#prompt", "And more?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.turn.assistant[data-finished]').length == 2",
                           timeout=120_000)
    assert "prompt tokens cached" in page.query_selector_all(".turn.assistant .stats")[1].inner_text()
    assert page.errors == []
