"""The app page in a real browser: Debian's headless Chromium driven by Playwright opens the page of a
`fastmaisi app` process, sets an organ size, generates with the demo, waits for the viewer, checks that the canvas
shows an image and that the legend lists the liver, and saves a screenshot (tests/artifacts/app.png)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"

if not Path(CHROMIUM).is_file():
    pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    out = tmp_path_factory.mktemp("app_out")
    proc = subprocess.Popen([sys.executable, "-m", "fastmaisi", "app", "--port", str(port), "--output-dir", str(out),
                             "--device", "cpu", "-q"], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/config", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, "fastmaisi app exited"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def launch(playwright, user_data_dir):
    """Debian's Chromium (never a downloaded one), headless, nothing contacted but the app."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 900})


def test_generate_in_the_page_and_see_the_volume(server, tmp_path):
    from PIL import Image

    with sync_api.sync_playwright() as p:
        ctx = launch(p, tmp_path / "profile")
        page = ctx.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        outside = []
        page.on("request", lambda r: None if r.url.startswith(server) or r.url.startswith("data:")
                else outside.append(r.url))
        page.goto(server)
        page.wait_for_selector("body[data-ready='1']")
        assert "not real CT" in page.inner_text("#notice")
        page.fill("#steps", "4")
        page.fill("#mask_steps", "10")  # few steps: the demo job takes seconds
        page.fill("#organ_liver", "0.12")  # a range input: fill sets its value and fires input
        page.dispatch_event("#organ_liver", "change")
        page.wait_for_function("document.getElementById('plan').textContent.startsWith('Mask: 10 steps')")
        assert page.is_checked("#use_liver") and page.inner_text("#out_liver") == "0.1200"
        page.click("#generate")
        page.wait_for_selector("#job-id:not(:empty)")
        page.wait_for_selector("body[data-viewer='ready']", timeout=300_000)
        page.wait_for_timeout(500)  # a frame after the load
        legend = page.inner_text("#legend")
        assert "liver" in legend
        assert page.inner_text("#job-status").startswith("done")
        ARTIFACTS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        pixels = np.asarray(Image.open(io.BytesIO(page.locator("#gl").screenshot())).convert("L"), dtype=float)
        assert pixels.std() > 10 and (pixels > 60).mean() > 0.02, "the viewer canvas is blank"
        # a reload finds the job again (the queue lives in the server)
        job_id = page.inner_text("#job-id")
        page.reload()
        page.wait_for_selector("body[data-viewer='ready']", timeout=60_000)
        assert page.inner_text("#job-id") == job_id
        ctx.close()
    assert not errors, errors
    assert not outside, f"the page fetched from outside the app: {outside}"
