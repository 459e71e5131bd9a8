"""Build the docs site and screenshot one of its pages with Debian's chromium (Playwright).

Usage: python tools/docs_screenshot.py [PAGE] [OUT.png]   (default: reference/api/)

The site is built with ``mkdocs build --strict`` into a temporary folder and served
on 127.0.0.1 for the browser; nothing is installed (no ``playwright install``).
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]


def main(page: str = "reference/api/", out: str = "docs-api-page.png") -> None:
    """Build, serve, open ``page`` at 1280x900 and save a screenshot of the window to ``out``."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as site:
        subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site],
            cwd=ROOT,
            check=True,
        )
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=site)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
                )
                tab = browser.new_page(viewport={"width": 1280, "height": 900})
                tab.goto(f"http://127.0.0.1:{server.server_address[1]}/{page}")
                tab.wait_for_load_state("networkidle")
                tab.screenshot(path=out)
                browser.close()
        finally:
            server.shutdown()
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
