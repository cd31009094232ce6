"""The chat page in a real headless browser (Debian's Chromium driven by Playwright): type a message, watch
the reply stream in, talk a second turn, check tool calls render as their own boxes, and save a screenshot
to tests/artifacts/. The server is real (uvicorn on 127.0.0.1) and so is the model (tiny, random)."""
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from tiny_models import PacedModel, tiny_chat_model
from nanochat_core.inference.serve import create_app
from nanochat_core.inference.serve_net import make_server

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def paced(tiny_tokenizer):
    model = tiny_chat_model(tiny_tokenizer.get_vocab_size(), sequence_len=4096)
    with torch.no_grad():
        # zero logit for every special token: with the page's top-k of 50 (of 512) they are never sampled,
        # so each reply runs to max_tokens of visible text and really streams
        for name in tiny_tokenizer.get_special_tokens():
            model.lm_head.weight[tiny_tokenizer.encode_special(name)] = 0.0
    return PacedModel(model, 0.01)


@pytest.fixture(scope="module")
def url(paced, tiny_tokenizer):
    yield from serving(create_app(paced, tiny_tokenizer))


@pytest.fixture
def keyed_url(paced, tiny_tokenizer):
    yield from serving(create_app(paced, tiny_tokenizer, api_key="page-k3y"))


def serving(app):
    server = make_server(app, "127.0.0.1", 0)   # the server run_server runs (Host check, timeouts, ...)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=20)


@pytest.mark.needs_tool("chromium")
def test_chat_page_streams_a_reply_in_a_real_browser(url):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            requests: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            expect(page.locator("#model")).to_have_text("nanochat")
            page.fill("#max_tokens", "60")
            page.fill("#temperature", "1.0")
            # record the reply's length whenever the page repaints it: a streamed reply is seen at many
            # partial lengths, a buffered one jumps from empty to complete
            page.evaluate("""() => { window.lengths = [];
                new MutationObserver(() => { const b = document.querySelector('.msg.assistant .body');
                    if (b) window.lengths.push(b.textContent.length); }).observe(document.getElementById('log'),
                    {subtree: true, childList: true, characterData: true}); }""")

            page.fill("#input", "Hello nanochat, tell me a story.")
            page.press("#input", "Enter")
            user = page.locator(".msg.user .body").first
            expect(user).to_have_text("Hello nanochat, tell me a story.")
            reply = page.locator(".msg.assistant .body").first
            expect(reply).not_to_have_class("body cursor", timeout=60_000)   # the stream has finished
            expect(page.locator("#send")).to_have_text("Send")
            first = reply.inner_text()
            assert first.strip(), "the assistant bubble stayed empty"
            partial = {n for n in page.evaluate("window.lengths") if 0 < n < len(reply.text_content())}
            assert len(partial) >= 3, f"the reply did not stream: seen at lengths {sorted(partial)}"
            assert page.locator(".msg.error").count() == 0

            # a second turn: the page sends the history back (user, assistant, user) and gets another reply
            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            second = page.locator(".msg.assistant .body").nth(1)
            expect(second).not_to_have_class("body cursor", timeout=60_000)
            expect(page.locator("#send")).to_have_text("Send")
            assert page.locator(".msg.error").count() == 0
            assert page.locator(".msg.user").count() == 2

            # Stop: a long reply is cut short by the button, and the conversation carries on afterwards
            page.fill("#max_tokens", "2000")
            page.fill("#input", "Go on for a long time.")
            page.press("#input", "Enter")
            third = page.locator(".msg.assistant .body").nth(2)
            expect(third).not_to_be_empty(timeout=30_000)
            expect(page.locator("#send")).to_have_text("Stop")
            page.click("#send")
            expect(page.locator("#send")).to_have_text("Send", timeout=10_000)
            expect(third).not_to_have_class("body cursor")
            expect(page.locator(".msg.assistant .note")).to_have_text(" (stopped)")
            page.fill("#max_tokens", "5")
            page.fill("#input", "Short one.")
            page.press("#input", "Enter")
            expect(page.locator(".msg.assistant .body").nth(3)).not_to_have_class("body cursor", timeout=30_000)
            expect(page.locator("#send")).to_have_text("Send")
            assert page.locator(".msg.error").count() == 0

            # tool calls render as their own boxes (the page's renderer, fed the server's marker format)
            # (the server writes a call as [calc EXPR = RESULT]; a reply still streaming may end mid-call)
            boxes = page.evaluate("""() => [ 'so [calc 12*7 = 84] done', 'so [calc 12*' ].map(text => {
                const el = document.createElement('span'); render(el, text);
                return [el.textContent, [...el.querySelectorAll('.tool')].map(s => [s.className, s.textContent])]; })""")
            assert boxes == [["so 12*784 done", [["tool python", "12*7"], ["tool python_output", "84"]]],
                             ["so 12*", [["tool python", "12*"]]]]

            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "webui_chat.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 5000
            assert errors == []
            assert all(r.startswith(url) for r in requests), f"page fetched something external: {requests}"
        finally:
            browser.close()


@pytest.fixture(scope="module")
def quickstart_url(tiny_tokenizer):
    """A model with the context of the Quickstart's (`nanochat train --local`: the local preset's sequence
    length), whose special tokens are never sampled: every reply runs as long as the server lets it, the
    worst case for a context this short."""
    from nanochat_core.stages.pipeline import LOCAL_MODEL
    model = tiny_chat_model(tiny_tokenizer.get_vocab_size(), sequence_len=LOCAL_MODEL["sequence_len"])
    with torch.no_grad():
        for name in tiny_tokenizer.get_special_tokens():
            model.lm_head.weight[tiny_tokenizer.encode_special(name)] = 0.0   # below the top 50: never sampled
    yield from serving(create_app(model, tiny_tokenizer, model_name="nanochat-local-sft"))


@pytest.mark.needs_tool("chromium")
def test_first_messages_on_a_phone_with_the_quickstart_model(quickstart_url):
    """What a newcomer does first: open the page on a phone-sized screen, touch no setting, send a message,
    then another. The header fits the screen (no sideways scrolling), the first message gets an answer, and
    when the conversation outgrows the model's 256-token context the oldest exchange is left out (with a
    note) instead of every later message failing."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True,
                                    has_touch=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(quickstart_url + "/")
            expect(page.locator("#model")).to_have_text("nanochat-local-sft")
            fits = """() => { const w = document.documentElement.clientWidth;
                const over = [...document.querySelectorAll('header, header *, form, form *')]
                    .filter(e => e.getBoundingClientRect().right > w + 0.5 || e.getBoundingClientRect().left < -0.5)
                    .map(e => e.id || e.tagName);
                return {scroll: document.documentElement.scrollWidth, width: w, over}; }"""
            layout = page.evaluate(fits)
            assert layout["over"] == [] and layout["scroll"] <= layout["width"], layout
            for field in ("#temperature", "#top_k", "#max_tokens", "#new", "#send", "#input"):
                assert page.locator(field).is_visible(), f"{field} is hidden on a phone"

            page.fill("#input", "Hello!")
            page.press("#input", "Enter")
            first = page.locator(".msg.assistant .body").first
            expect(first).not_to_have_class("body cursor", timeout=60_000)
            expect(page.locator("#send")).to_have_text("Send")
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.inner_text()
            assert len(first.inner_text().strip()) > 50        # the whole context's worth of reply, not one token

            page.fill("#input", "And then?")
            page.press("#input", "Enter")
            second = page.locator(".msg.assistant .body").nth(1)
            expect(second).not_to_have_class("body cursor", timeout=60_000)
            expect(page.locator("#send")).to_have_text("Send")
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").first.inner_text()
            assert second.inner_text().strip()
            expect(page.locator(".msg.dropped")).to_contain_text("left out")
            assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
            layout = page.evaluate(fits)
            assert layout["over"] == [] and layout["scroll"] <= layout["width"], layout

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "webui_phone.png"))
            assert errors == []
        finally:
            browser.close()


@pytest.mark.needs_tool("chromium")
def test_chat_page_asks_for_the_api_key_and_uses_it(keyed_url):
    """A server started with --api-key: the page shows a key field, refuses politely without it, and chats
    once it is given (sent as `Authorization: Bearer`, kept for the tab only)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(keyed_url + "/")
            expect(page.locator("#key_label")).to_be_visible()      # /v1/models said 401
            expect(page.locator("#model")).to_have_text("")
            page.fill("#max_tokens", "5")
            page.fill("#input", "Hello?")
            page.press("#input", "Enter")
            expect(page.locator(".msg.error")).to_contain_text("needs an API key")
            page.fill("#api_key", "page-k3y")
            page.press("#api_key", "Enter")
            expect(page.locator("#model")).to_have_text("nanochat")
            page.fill("#input", "Hello again?")
            page.press("#input", "Enter")
            reply = page.locator(".msg.assistant .body").last
            expect(reply).not_to_have_class("body cursor", timeout=30_000)
            assert reply.inner_text().strip()
            assert page.locator(".msg.error").count() == 1             # only the first, keyless try
            assert "page-k3y" not in page.url
            assert errors == []
        finally:
            browser.close()
