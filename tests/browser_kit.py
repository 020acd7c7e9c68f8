"""What the real-browser tests share: Debian's chromium driven by Playwright, headless, and
a saelab server on 127.0.0.1 in a thread.

Set-up (Playwright's own browser download does not work offline):
    apt-get install -y chromium
    .venv/bin/pip install playwright
CI sets SAELAB_REQUIRE_BROWSER=1 (`make test` installs both), so a missing browser fails
there instead of silently skipping the only real-browser tests. Screenshots go to
test-artifacts/.
"""

import contextlib
import os
import shutil
import threading
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
EVIL = "<img src=x onerror=alert(1)>"
"""Markup as model text: it must show as text, never run."""

if os.environ.get("SAELAB_REQUIRE_BROWSER") == "1" and CHROMIUM is None:
    raise RuntimeError("SAELAB_REQUIRE_BROWSER=1 but chromium is not installed")
NO_BROWSER = "chromium is not installed (apt-get install -y chromium)"


@contextlib.contextmanager
def served(folder):
    """`saelab serve FOLDER` on a free port in a thread; yields its base URL."""
    from saelab.app.server import make_server

    server = make_server(folder, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def chromium_page(width: int = 1200, height: int = 900):
    """A page of headless chromium; `page.dialogs` collects (and dismisses) any alert."""
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.dialogs = []
        page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
        try:
            yield page
        finally:
            browser.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
