"""The demo in a real browser: Debian's headless Chromium, driven by Playwright.

Playwright's own browser download (`playwright install`) is never used: the test points Playwright at the
`chromium` package's binary. The server runs as users start it (`python -m hf_specssm_demo`), on a free
port of 127.0.0.1, with an empty model cache so that only the random-weight toy pair is on offer. The
final page is saved to `artifacts/demo-browser.png`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = os.environ.get("HF_SPECSSM_CHROMIUM") or shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,  # a server and a browser: ~35 s on 2 cores
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's `chromium` is not installed (`make test` installs it as root: apt-get install chromium)",
    ),
]
pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parents[2] / "artifacts"
SERVER_START_S = 120
RACE_S = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the demo server did not answer within {SERVER_START_S} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    """The URL of a demo server started for this module (toy models only)."""
    folder = tmp_path_factory.mktemp("demo-server")
    port = _free_port()
    env = {
        **os.environ,
        "HF_SPECSSM_CACHE": str(folder / "empty-model-cache"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
    }
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "hf_specssm_demo", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    """A page of a fresh headless Chromium profile; records the hosts it sends requests to."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        page = context.new_page()
        page.requested_hosts = set()
        page.on("request", lambda request: page.requested_hosts.add(urlparse(request.url).netloc))
        try:
            yield page
        finally:
            context.close()


def _open(page, url: str) -> None:
    page.goto(url)
    sync_api.expect(page.locator("#run")).to_be_visible(timeout=30_000)


def _words(text: str) -> str:
    return " ".join(text.split())


def test_bad_input_gets_a_visible_message(browser_page, demo_url):
    page = browser_page
    _open(page, demo_url)
    page.locator("#prompt textarea").fill("")
    page.locator("#run").click()
    sync_api.expect(page.locator("#status")).to_contain_text("Type a prompt first.", timeout=30_000)
    page.locator("#prompt textarea").fill("Hello world")
    page.locator("#max-new-tokens input").fill("1000000")
    page.locator("#run").click()
    sync_api.expect(page.locator("#status")).to_contain_text("between 1 and 512", timeout=30_000)
    assert "Traceback" not in page.content()


def test_greedy_race_in_the_browser(browser_page, demo_url):
    page = browser_page
    _open(page, demo_url)
    sync_api.expect(page.locator("#model-note")).to_contain_text("Random-weight demo models")
    page.locator("#prompt textarea").fill("Hello world")
    page.locator("#max-new-tokens input").fill("24")
    page.locator("#run").click()

    stats = page.locator("#stats")
    sync_api.expect(stats).to_contain_text("Greedy outputs identical", timeout=RACE_S * 1000)
    assert "Greedy outputs identical: yes" in stats.inner_text()
    for fact in ("tokens/s", "Speed-up", "mean accepted length τ", "acceptance"):
        assert fact in stats.inner_text()
    plain = _words(page.locator("#plain-output .lane").inner_text())
    speculative = _words(page.locator("#spec-output .lane").inner_text())
    assert plain and plain == speculative
    assert len(plain.split()) == 24  # the toy codec spells each token as one word
    # Both kinds of token are highlighted inline, each in its own colour (the legend names them).
    assert page.locator("#spec-output .lane .from-draft").count() >= 1
    assert page.locator("#spec-output .lane .from-target").count() >= 1
    legend = page.locator("#spec-output .legend").inner_text()
    assert "accepted draft" in legend and "target" in legend
    assert "tokens/s" in page.locator("#plain-meter").inner_text()
    assert "τ" in page.locator("#spec-meter").inner_text()
    sync_api.expect(page.locator("#rounds-chart canvas, #rounds-chart .vega-embed").first).to_be_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-browser.png"), full_page=True)
    # Analytics off and fonts local: the page talked to the demo server only.
    assert page.requested_hosts == {urlparse(demo_url).netloc}
