"""report.html in a real browser: headless Chromium renders it, takes a screenshot, and the page
logs no error (console, uncaught exception, failed resource). The summary box comes first.

Driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on
file descriptors 3 and 4), so every console message and exception is seen, not only those the
browser happens to print. Slow: it starts a browser. Skipped, saying why, only when no Chromium
is installed (``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from clinfuse.cli import main

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-pipe", "--window-size=1280,1600")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium spoken to over the DevTools pipe."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads the protocol on fd 3 and writes it on fd 4. The child's ends are first
        # moved above 9 so that putting them on 3 and 4 cannot overwrite one with the other; bash
        # (dash takes one-digit descriptors only) then redirects them and becomes the browser
        # (no preexec_fn: unsafe with threads).
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chrome_r, from_chrome_w)]
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        to_chrome_r, from_chrome_w = high
        remap = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
        self.proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", remap, binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                      "about:blank"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, pass_fds=(to_chrome_r, from_chrome_w))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chrome], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._from_chrome, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read(deadline))
        except TimeoutError:
            pass

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def render(binary: str, page: Path, screenshot: Path, profile: Path) -> dict:
    """Load ``page``; returns ``{"errors": [...], "first_id", "first_text", "images": [...]}`` and
    writes a full-page PNG screenshot to ``screenshot``."""
    browser = Browser(binary, profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        browser.drain(1.0)  # late console messages and resource failures
        probe = browser.call("Runtime.evaluate", {"returnByValue": True, "expression": """(() => {
            const first = document.body.firstElementChild;
            return {first_id: first && first.id, first_text: first && first.innerText,
                    images: Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth,
                                                                  shown: i.getBoundingClientRect().width}))};
        })()"""}, session=session)["result"]["value"]
        shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                            session=session)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        browser.close()
    errors = []
    for event in browser.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            errors.append(params["exceptionDetails"].get("exception", {}).get("description")
                          or params["exceptionDetails"].get("text"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert", "warning"):
            errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            errors.append(params["entry"].get("text"))
    return {"errors": errors, **probe}


@pytest.fixture(scope="module")
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium found (looked for chromium, chromium-browser, google-chrome); "
                    "install Debian's: apt-get install -y chromium (.ci/run does)")
    return binary


def test_the_harness_sees_page_errors(tmp_path, chromium):
    # Without this, a harness that saw nothing would pass every report.
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body><p id='x'>hi</p>"
                    "<img src='missing.png'><script>console.error('boom'); undefinedFunction();</script>"
                    "</body></html>")
    out = render(chromium, page, tmp_path / "bad.png", tmp_path / "profile")
    joined = " | ".join(map(str, out["errors"]))
    assert "boom" in joined and "undefinedFunction" in joined, joined  # console.error, uncaught exception
    assert "ERR_FILE_NOT_FOUND" in joined or "Failed to load resource" in joined, joined  # missing file


def test_report_renders_without_errors_and_opens_with_its_summary(tmp_path, chromium, small_cfg):
    from test_evaluation_commands import write_study

    _cfg, data, manifests, ckpts = write_study(tmp_path, small_cfg, privacy={
        "enabled": True, "epsilon": 7.999984728778938, "delta": 1e-5, "privacy_unit": "patient",
        "per_site": {"site-0": 7.999984728778938, "site-1": 6.5}, "accountant": "prv"})
    eval_cfg = tmp_path / "eval.yaml"
    eval_cfg.write_text(yaml.safe_dump(dict(data, evaluation={**data["evaluation"], "bootstrap": 200},
                                            train={**data["train"], "num_threads": 1})))
    threads = torch.get_num_threads()
    try:
        assert main(["evaluate", "--checkpoint", *map(str, ckpts), "--manifest", *map(str, manifests),
                     "--out", str(tmp_path / "report"), "--config", str(eval_cfg), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = tmp_path / "report" / "report.html"
    html = report.read_text()
    # Readable provenance: no raw dump, no full hash, epsilon rounded and stated once.
    assert "privacy.epsilon=" not in html and "7.999984728778938" not in html
    assert read_hash(ckpts[0]) not in html and read_hash(ckpts[0])[:12] in html
    assert html.count("ε = ") == 2  # once per checkpoint, in the summary box
    assert "ε = 6.50 to 8.00 per site" in html and "δ = 1e-5" in html

    shot = tmp_path / "report.png"
    out = render(chromium, report, shot, tmp_path / "profile")
    assert out["errors"] == []
    assert out["first_id"] == "summary"
    for words in ("AUROC", "accuracy", "balanced accuracy", "Data", "Privacy", "Warnings"):
        assert words in out["first_text"], words
    # Every figure decoded, and drawn at a readable size (not a thumbnail).
    assert len(out["images"]) == 4
    assert all(img["complete"] and img["width"] >= 600 and img["shown"] >= 500 for img in out["images"])

    from PIL import Image

    with Image.open(shot) as image:
        assert image.width >= 1200 and image.height > 3000  # the full page, not one screen
        assert len(set(image.convert("L").resize((64, 256)).getdata())) > 20  # drawn, not blank


def read_hash(path) -> str:
    from clinfuse.training.checkpoint import read_checkpoint

    return read_checkpoint(path)["model_hash"]
