"""The page at / in real headless Chromium (Debian's package, driven by Playwright), against a
real server with an API key: type a prompt, pick a size, watch the blocks go by, see the image.

Slow and needs the system browser (apt-get install -y chromium; pip install playwright), so it is
opt-in: ``python -m pytest -m slow tests/test_serve_page.py``. Set BITDANCE_SCREENSHOT=PATH to
keep the screenshot."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitdance_rt.serve.client import free_port, wait_ready
from bitdance_rt.tiny import make_tiny

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_page_generates_an_image_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no system Chromium (apt-get install -y chromium)")
    ckpt = make_tiny(tmp_path / "tiny64", parallel_num=64, seed=0)
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
         "-c", str(ckpt), "--port", str(port), "--api-key", "pagekey", "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    shot = tmp_path / "page.png"
    try:
        wait_ready(base, 180, proc)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 560},
                                    http_credentials={"username": "me", "password": "pagekey"})
            page.goto(base + "/")
            page.wait_for_selector("#size option[value='896x256']", state="attached")
            page.fill("#prompt", "a lighthouse on a rocky coast at dusk")
            page.select_option("#size", "896x256")
            page.fill("#seed", "7")
            page.fill("#steps", "40")
            page.click("#go")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('block ')",
                timeout=120_000)
            seen = page.text_content("#status")
            page.wait_for_selector("#result:not([hidden])", timeout=300_000)
            assert page.get_attribute("#result", "src").startswith("data:image/png;base64,")
            size = page.evaluate("[document.getElementById('result').naturalWidth, "
                                 "document.getElementById('result').naturalHeight]")
            assert size == [896, 256]
            assert page.text_content("#status").startswith("done in")
            assert "/ 14" in seen, seen
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    if os.environ.get("BITDANCE_SCREENSHOT"):
        shutil.copy(shot, os.environ["BITDANCE_SCREENSHOT"])
