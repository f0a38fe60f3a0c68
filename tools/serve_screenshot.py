#!/usr/bin/env python
"""The screenshot of `bitdance-rt serve`'s page in docs/serve.md: the built-in demo model
answering a prompt in headless Chromium.

Needs the system Chromium (``apt-get install -y chromium``) and Playwright (``pip install
playwright``; its own browser download is not used). Starts ``bitdance-rt serve`` on a free
loopback port with a throwaway key, types the prompt into the page, waits for the image and
writes the screenshot::

    python tools/serve_screenshot.py --out docs/serve_screenshot.png
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bitdance_rt.serve.client import free_port, wait_ready  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--prompt", default="a red circle on the left, on a white background")
    ap.add_argument("--seed", default="42")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        ap.error("needs Playwright: pip install playwright")
    if not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium}: apt-get install -y chromium, or --chromium PATH")
    port, key = free_port(), secrets.token_urlsafe(16)
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = open(Path(tmp) / "server.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-c", "from bitdance_rt.cli import rt_entry; rt_entry()", "serve",
             "--port", str(port), "--api-key", key, "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait_ready(base, 180, proc)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, args=ARGS)
                page = browser.new_page(viewport={"width": 1000, "height": 560},
                                        http_credentials={"username": "me", "password": key})
                page.goto(base + "/")
                page.wait_for_selector("#size option", state="attached")
                page.fill("#prompt", args.prompt)
                page.fill("#seed", args.seed)
                page.click("#go")
                page.wait_for_selector("#result:not([hidden])", timeout=300_000)
                page.screenshot(path=str(Path(tmp) / "page.png"), full_page=True)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(60)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "page.png", args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
