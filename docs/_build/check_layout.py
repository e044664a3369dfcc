"""Load every page of the built site in headless Chromium at 1280 px and fail on anything cut off horizontally.

    python docs/_build/check_layout.py site                    # after mkdocs build
    python docs/_build/check_layout.py site --width 1280 --screenshots build/layout

A table, code block, signature or image is *cut off* when its content is wider than the box that shows it and the
rest is hidden or behind a scroll bar, or when it runs past the content column or the window. Each such element is
reported with its page and its first words, and a screenshot of the page is saved. Exit codes: 0 every page fits;
1 something is cut off; 2 no Chromium was found (``--browser`` or ``$CHROMIUM`` names one; on Debian/Ubuntu:
``apt-get install chromium``) or it could not be driven.

Only the standard library: the browser is driven through the Chrome DevTools Protocol over a pipe
(``--remote-debugging-pipe``), so no driver or client package is needed.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
EXIT_CLIPPED, EXIT_NO_BROWSER = 1, 2

MEASURE = r"""
(async () => {
  await document.fonts.ready;
  const problems = [];
  const root = document.documentElement;
  const describe = (el) => {
    const text = (el.innerText || el.getAttribute("alt") || "").trim().replace(/\s+/g, " ");
    return `<${el.tagName.toLowerCase()}${el.className ? ` class="${el.className}"` : ""}> "${text.slice(0, 70)}"`;
  };
  if (root.scrollWidth > root.clientWidth + 1) {
    problems.push(`the page is ${root.scrollWidth}px wide in a ${root.clientWidth}px window`);
  }
  const column = document.querySelector(".md-content");
  if (!column) return problems;
  const right = column.getBoundingClientRect().right;
  const boxes = ".md-typeset__scrollwrap, .md-typeset__table, table, pre, pre > code, .highlight, img, .doc-signature";
  for (const el of column.querySelectorAll(boxes)) {
    const rect = el.getBoundingClientRect();
    if (rect.width === 0 && rect.height === 0) continue;  // not shown (e.g. a closed <details>)
    const overflow = getComputedStyle(el).overflowX;
    if (el.scrollWidth > el.clientWidth + 1 && overflow !== "visible") {
      const sizes = `${el.scrollWidth}px of content in a ${el.clientWidth}px box`;
      problems.push(`${describe(el)}: ${sizes} (overflow ${overflow})`);
    } else if (rect.right > right + 1) {
      problems.push(`${describe(el)}: runs ${Math.round(rect.right - right)}px past the content column`);
    }
  }
  for (const el of column.querySelectorAll(".md-content__inner > *, .md-content__inner p, .md-content__inner li")) {
    const rect = el.getBoundingClientRect();
    if (rect.right > right + 1 && el.scrollWidth > 0) {
      problems.push(`${describe(el)}: runs ${Math.round(rect.right - right)}px past the content column`);
    }
  }
  return [...new Set(problems)];
})()
"""


class BrowserError(RuntimeError):
    """The browser could not be started or driven."""


class Chromium:
    """A headless Chromium driven over the DevTools protocol's pipe transport (fd 3 in, fd 4 out)."""

    def __init__(self, executable: str, width: int, height: int) -> None:
        self._profile = tempfile.mkdtemp(prefix="layout-check-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire() -> None:  # in the child: the protocol's fds 3 and 4 (moved out of the way first)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        args = [
            executable,
            "--headless=new",
            "--remote-debugging-pipe",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={self._profile}",
            f"--window-size={width},{height}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run its sandbox as root (containers, CI)
        self._process = subprocess.Popen(
            args,
            pass_fds=(3, 4),  # the fds wire() set up, kept open across exec
            preexec_fn=wire,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=True,
        )

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")

    def _receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise BrowserError("the browser stopped answering")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise BrowserError(f"the browser exited: {err.strip()[-2000:]}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict[str, Any] | None = None, *, session: bool = False) -> dict[str, Any]:
        """Send one command and return its result (events that arrive meanwhile are kept in ``events``)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        self._send(message)
        deadline = time.monotonic() + 60
        while True:
            reply = self._receive(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def load(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        self.call("Page.navigate", {"url": url}, session=True)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._receive(deadline))

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True}, session=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"the page check failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (BrowserError, OSError):
            pass
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)


def find_browser(given: str | None) -> str | None:
    """The browser to use: ``given``, ``$CHROMIUM``, or the first of :data:`BROWSERS` on ``PATH``."""
    for name in (given, os.environ.get("CHROMIUM"), *BROWSERS):
        if name and (found := shutil.which(name)):
            return found
    return None


def pages(site: Path) -> list[Path]:
    """Every HTML page of the built site (mkdocs' 404 and search scaffolding left out)."""
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html" and "search" not in p.parts)


def check(site: Path, browser: str, width: int, screenshots: Path | None) -> dict[str, list[str]]:
    """The problems of each page that has any."""
    chromium = Chromium(browser, width, 900)
    found: dict[str, list[str]] = {}
    try:
        for page in pages(site):
            chromium.load(page.resolve().as_uri())
            problems = chromium.evaluate(MEASURE) or []
            if problems:
                name = str(page.relative_to(site))
                found[name] = problems
                if screenshots is not None:
                    chromium.screenshot(screenshots / (name.replace("/", "_") + ".png"))
    finally:
        chromium.close()
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("site", type=Path, help="the built site (mkdocs' site_dir)")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    parser.add_argument("--browser", help="Chromium or Chrome executable (default: $CHROMIUM, then PATH)")
    parser.add_argument("--screenshots", type=Path, default=Path("build/layout-check"), help="where to save them")
    args = parser.parse_args(argv)
    browser = find_browser(args.browser)
    if browser is None:
        print(
            "layout check: no Chromium found (tried $CHROMIUM and " + ", ".join(BROWSERS) + "). Install one "
            "(Debian/Ubuntu: apt-get install chromium) or pass --browser.",
            file=sys.stderr,
        )
        return EXIT_NO_BROWSER
    if not pages(args.site):
        print(f"layout check: no HTML pages under {args.site}; build the site first (mkdocs build)", file=sys.stderr)
        return EXIT_NO_BROWSER
    try:
        found = check(args.site, browser, args.width, args.screenshots)
    except (BrowserError, OSError) as err:
        print(f"layout check: could not drive {browser}: {err}", file=sys.stderr)
        return EXIT_NO_BROWSER
    checked = len(pages(args.site))
    if not found:
        print(f"layout check: {checked} pages at {args.width} px, nothing cut off ({browser})")
        return 0
    for page, problems in found.items():
        print(f"{page}:")
        for problem in problems:
            print(f"  - {problem}")
    print(
        f"layout check: {len(found)} of {checked} pages cut something off at {args.width} px; screenshots in "
        f"{args.screenshots}",
        file=sys.stderr,
    )
    return EXIT_CLIPPED


if __name__ == "__main__":
    sys.exit(main())
