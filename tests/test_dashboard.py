"""The dashboard of `flux_lora watch OUT --serve HOST:PORT` in a real headless Chromium: it renders
the loss chart from the run's events, updates when new events arrive, shows the previews and the
result, and the server hands out nothing but the page, the events and the run's preview images.

    pytest -q tests/test_dashboard.py      (needs Debian's chromium and chromium-driver)
"""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from PIL import Image

from browser import CHROMEDRIVER, CHROMIUM, Browser, free_port
from conftest import ROOT, cli_env
from flux_lora.outputs.events import Reporter

LOSS_RGB = (0xE4, 0x57, 0x2E)  # the loss line's colour in dashboard.html


def _progress(rep, step, total=10):
    rep.progress(step, step=step, total_steps=total, progress=step / total, loss=1.0 / step, avg_loss=1.2 / step,
                 learning_rate=1e-4, samples_per_s=3.5, eta_s=(total - step) * 2.0, elapsed_s=step * 2.0)


@pytest.fixture
def served(tmp_path):
    """A run folder mid-run (5 of 10 steps, a preview, a checkpoint, a warning) and its server."""
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    Image.new("RGB", (64, 32), (20, 160, 220)).save(out / "samples" / "step-000004.png")
    (out / "config.yaml").write_text("secret: not for the page\n")
    rep = Reporter(out / "events.jsonl", "train")
    rep.emit("start", total_steps=10, world_size=2, dataset_size=8, family="flux1", global_batch=2, start_step=0)
    rep.emit("validation", step=0, loss=1.5, items=2)
    for step in range(1, 6):
        _progress(rep, step)
    rep.emit("sample", step=4, path=str(out / "samples" / "step-000004.png"), prompts=["sks, a red circle"])
    rep.emit("checkpoint", step=4, path=str(out / "checkpoints" / "step-000004"))
    rep.warning("a warning the page shows")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flux_lora", "watch", str(out), "--serve", f"127.0.0.1:{port}"],
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and server.poll() is None, "the server did not start"
            time.sleep(0.2)
    try:
        yield out, rep, f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        rep.close()


def _get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
        return r.status, dict(r.headers), r.read()


def test_the_server_serves_the_page_events_and_previews_only(served):
    out, rep, base = served
    status, headers, page = _get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"] and "connect-src 'self'" in headers["Content-Security-Policy"]
    text = page.decode()
    assert "http://" not in text and "https://" not in text and "<canvas" in text  # nothing from outside
    assert len(page) < 20_000
    status, headers, image = _get(base + "/samples/step-000004.png")
    assert headers["Content-Type"] == "image/png" and image == (out / "samples" / "step-000004.png").read_bytes()
    for path in ("/samples/..%2Fconfig.yaml", "/samples/../config.yaml", "/config.yaml", "/events.jsonl",
                 "/samples/nothing.png", "/samples/%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(base + path)
    # a reconnecting browser sends the last id it saw and gets only what came after it
    rep.done(lora=str(out / "lora.safetensors"), steps=5)
    _, _, body = _get(base + "/events", {"Last-Event-ID": "8"})
    ids = [int(line[4:]) for line in body.decode().splitlines() if line.startswith("id: ")]
    assert ids == [9, 10, 11]


def _loss_pixels(png, rect):
    """Pixels of the loss line's colour inside the chart's rectangle of a screenshot."""
    import numpy as np

    box = (int(rect["x"]), int(rect["y"]), int(rect["x"] + rect["width"]), int(rect["y"] + rect["height"]))
    pixels = np.asarray(Image.open(png).convert("RGB").crop(box), dtype=np.int16)
    return int((np.abs(pixels - np.array(LOSS_RGB)) < 40).all(axis=-1).sum())


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_the_page_draws_the_chart_and_follows_the_run(served, tmp_path):
    out, rep, base = served
    browser = Browser()
    try:
        browser.go(base + "/")
        browser.wait_for("return document.getElementById('step').textContent === '5/10'")
        assert browser.js("return window.dashboard.loss.length") == 5
        assert browser.js("return window.dashboard.val.length") == 1
        assert browser.js("return document.getElementById('eta').textContent") == "0:10"
        assert browser.wait_for("const i = document.getElementById('preview'); return i.complete && i.naturalWidth") == 64
        assert "step-000004" in browser.js("return document.getElementById('checkpoints').textContent")
        assert "a warning the page shows" in browser.js("return document.getElementById('warnings').textContent")
        rect = browser.js("return document.getElementById('chart').getBoundingClientRect().toJSON()")
        before = _loss_pixels(browser.screenshot(tmp_path / "before.png"), rect)
        assert before > 100, "the loss line is not drawn"

        for step in range(6, 9):  # the run goes on: the open page follows
            _progress(rep, step)
        rep.emit("validation", step=8, loss=0.4, items=2)
        browser.wait_for("return document.getElementById('step').textContent === '8/10'")
        browser.wait_for("return window.dashboard.val.length === 2")
        after_png = browser.screenshot(tmp_path / "after.png")
        assert _loss_pixels(after_png, rect) > before  # the line grew to the new steps
        assert Image.open(tmp_path / "before.png").tobytes() != Image.open(after_png).tobytes()

        rep.done(lora=str(out / "lora.safetensors"), steps=8, final_loss=0.125)
        browser.wait_for("return document.getElementById('status').textContent === 'done'")
        assert "lora.safetensors" in browser.js("return document.getElementById('result').textContent")

        browser.go(base + "/")  # opened after the run: the whole history, then the result
        browser.wait_for("return document.getElementById('status').textContent === 'done'")
        assert browser.js("return window.dashboard.loss.length") == 8
        assert _loss_pixels(browser.screenshot(tmp_path / "late.png"), rect) > 100
    finally:
        browser.close()
