"""Drive the page of `ddpm export --web` in headless Chromium (playwright on the system's chromium), served from a
local HTTP server on 127.0.0.1. Used by tests/test_web.py, and to take the README's screenshot (the page after one
generation, cut below the last line):

    python tests/browser.py SITE_DIR assets/web_page.png --count 20 --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import shutil
import threading

import numpy as np


def find_chromium() -> str | None:
    """$DDPM_CHROMIUM, else Debian's chromium on the PATH."""
    return os.environ.get("DDPM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def serve(folder):
    """A static HTTP server for `folder` on 127.0.0.1 (a free port) in a thread; yields its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def open_page(folder, chromium: str, width: int = 760, height: int = 560, load_timeout_s: float = 120):
    """The page of `folder` in headless Chromium, once its generator has loaded (status 'ready')."""
    from playwright.sync_api import sync_playwright

    with serve(folder) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url + "index.html")
            page.wait_for_selector("#status[data-state=ready], #status[data-state=error]",
                                   timeout=load_timeout_s * 1000)
            if page.get_attribute("#status", "data-state") == "error":
                raise RuntimeError(f"the page could not load its generator: {page.inner_text('#status')}")
            yield page
        finally:
            browser.close()


def generate(page, label: str, count: int, guidance: float | None, seed, timeout_s: float = 600) -> dict:
    """Fill the form, press Generate, wait; returns the state, the status text, the time the page measured (ms) and
    the canvas as a (H, W, 4) uint8 array."""
    page.select_option("#label", label)
    page.fill("#count", str(count))
    if guidance is not None:   # None: the value the page loaded (model.json's guidance)
        page.fill("#guidance", str(guidance))
    page.fill("#seed", str(seed))
    page.click("#go")
    page.wait_for_selector("#status[data-state=done], #status[data-state=error]", timeout=timeout_s * 1000)
    state = page.get_attribute("#status", "data-state")
    out = {"state": state, "status": page.inner_text("#status"), "cli": page.inner_text("#cli")}
    if state == "done":
        out["ms"] = float(page.get_attribute("#status", "data-ms"))
        w, h, data = page.evaluate("""() => { const c = document.getElementById('digits');
            return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
        out["canvas"] = np.array(data, dtype=np.uint8).reshape(h, w, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("site")
    ap.add_argument("png")
    ap.add_argument("--label", default="turn")
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=0.3)
    ap.add_argument("--seed", default="0")
    args = ap.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no chromium found (apt-get install chromium, or set DDPM_CHROMIUM)")
    with open_page(args.site, chromium) as page:
        res = generate(page, args.label, args.count, args.guidance, args.seed)
        print(res["status"], "|", res["cli"])
        box = page.locator("#cli").bounding_box()
        page.screenshot(path=args.png, clip={"x": 0, "y": 0, "width": page.viewport_size["width"],
                                             "height": box["y"] + box["height"] + 16})
    from PIL import Image   # a small PNG for the README: 64 colours are plenty for a grey page

    Image.open(args.png).convert("P", palette=Image.ADAPTIVE, colors=64).save(args.png, optimize=True)


if __name__ == "__main__":
    main()
