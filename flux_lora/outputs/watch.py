"""`flux_lora watch DIR`: follow a run's events.jsonl from anywhere that can read it, and
`--serve HOST:PORT`: the same stream over HTTP, with a dashboard page.

    GET /              the dashboard (dashboard.html): progress, ETA, samples/s, loss and validation
                       chart, latest previews, checkpoints, warnings, result; live from /events
    GET /events        text/event-stream: every event so far, then live ones; ends after done/error;
                       a reconnect with Last-Event-ID gets only the events after it
    GET /state         the latest state as JSON (last progress, last event, finished or not)
    GET /samples/NAME  a preview image of the run (its samples/ folder; nothing else is served)

Works before the run starts (waits for the file) and after it ended (replays, then exits).
Exit codes: 0 after `done`, the run's own code after `error` (1 crash, 2 bad input, 4 diverged,
5 another rank failed), 3 after `stopped` (resumable), 1 when the run's process is gone without
either, 124 on --timeout. No Access-Control-Allow-Origin header: a web page open in the user's
browser cannot read the run's config and events through it.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from flux_lora.outputs.display import Display, progress_line
from flux_lora.outputs.run_dir import lock_state

TERMINAL = {"done": 0, "error": 1, "stopped": 3}
POLL_S = 0.2
DASHBOARD = Path(__file__).with_name("dashboard.html")
_IMAGE_NAME = re.compile(r"^[\w.-]+\.(png|jpg|jpeg|webp)$", re.IGNORECASE)
_IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}
# the page may talk to this server only: no outside scripts, styles, images or connections
_PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def events_path(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir if run_dir.suffix == ".jsonl" else run_dir / "events.jsonl"


def follow(path: Path, timeout: float = 0, stop: threading.Event | None = None) -> Iterator[dict | None]:
    """Yield events as they are appended; yields None when idle (caller decides to stop)."""
    start, pos, partial = time.time(), 0, ""
    while stop is None or not stop.is_set():
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()  # an unfinished last line waits for its newline
            for line in lines:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
        yield None
        if timeout and time.time() - start > timeout:
            return
        time.sleep(POLL_S)


def exit_code(ev: dict) -> int:
    """The run's own exit code for a terminal event (an error event carries it: 2 bad input,
    4 diverged, 5 another rank failed, 1 a crash); older events without it: 0, 1 or 3."""
    code = ev.get("exit_code")
    return int(code) if isinstance(code, int) else TERMINAL[ev["event"]]


def finished(events: list[dict]) -> int | None:
    """Exit code of the last terminal event, unless a later start shows the run going on."""
    code = None
    for ev in events:
        if ev.get("event") == "start":
            code = None
        elif ev.get("event") in TERMINAL:
            code = exit_code(ev)
    return code


class Liveness:
    """Whether a started run's process is still there, from its directory's lock: gone when the
    lock is stale (its process died, or fell silent on another host), or was seen held and is now
    released, without a done/error/stopped event (SIGKILL, the OOM killer, a lost node). A run
    without a lock (older versions, hand-written events) is never declared gone."""

    def __init__(self, folder: Path, every_s: float = 1.0, confirmations: int = 3):
        self.folder, self.every_s, self.needed = folder, every_s, confirmations
        self.last, self.misses, self.seen_held = 0.0, 0, False

    def gone(self) -> bool:
        if time.time() - self.last < self.every_s:
            return False
        self.last = time.time()
        state = lock_state(self.folder)
        self.seen_held = self.seen_held or state == "held"
        lost = state == "stale" or (state == "absent" and self.seen_held)
        self.misses = self.misses + 1 if lost else 0
        return self.misses >= self.needed


def _show(ev: dict, display: Display | None, last_progress: dict | None) -> Display | None:
    """Print one event for a person; returns the display (a start event makes a new one)."""
    kind = ev.get("event")
    say = display.message if display else print
    if kind == "start":
        if display:
            display.close()
        display = Display(ev.get("total_steps") or ev.get("dataset_size") or 0, ev.get("stage", "run"), every=1)
        display.message(f"{ev.get('stage')} started: world size {ev.get('world_size')}, {ev.get('dataset_size')} items"
                        + (f", from step {ev['start_step']}" if ev.get("start_step") else ""))
    elif kind == "progress" and display:
        display.update(ev.get("step") or ev.get("done") or 0, ev)
    elif kind in ("warning", "error", "stopped"):
        say(f"{kind}: {ev.get('message', '')}")
    elif kind in ("checkpoint", "sample"):
        say(f"{kind} at step {ev.get('step')}: {ev.get('path')}")
    elif kind == "validation":
        say(f"validation at step {ev.get('step')}: loss {ev.get('loss', float('nan')):.5f}" + ("  (best so far)" if ev.get("best") else ""))
    elif kind == "done":
        say(f"done: {done_line(ev, last_progress)}")
        if ev.get("best"):
            say(f"best: {ev['best']['path']}: {ev['best']['reason']}")
    return display


def done_line(ev: dict, last_progress: dict | None) -> str:
    """The done event's own figures (for preprocess: items of all ranks, not what rank 0 saw)."""
    if ev.get("stage") == "preprocess":
        rate = ev.get("items_per_s")
        return (f"preprocess {ev.get('total_items', '?')} items in the cache, {ev.get('skipped', 0)} skipped"
                + (f", {ev['encoded_items']} encoded at {rate:.1f}/s" if ev.get("encoded_items") and rate else ""))
    return progress_line(last_progress) if last_progress else "done"


def watch_events(run_dir: Path, timeout: float = 0) -> int:
    path = events_path(run_dir)
    if not path.is_file():
        print(f"waiting for {path} ...", file=sys.stderr, flush=True)
    display, last_progress, code, started = None, None, None, False
    alive = Liveness(path.parent)
    for ev in follow(path, timeout):
        if ev is None:
            if code is not None:
                break
            if started and alive.gone():
                print(f"the run writing {path} is gone without a done or error event (killed? out of memory?); "
                      "see its log, then rerun the same command to resume", file=sys.stderr)
                code = 1
                break
            continue
        display = _show(ev, display, last_progress)
        kind = ev.get("event")
        started, code = (True, None) if kind == "start" else (started, code)
        last_progress = ev if kind == "progress" else last_progress
        if kind in TERMINAL:
            code = exit_code(ev)
    if display:
        display.close()
    if code is None:
        print(f"gave up after {timeout:g} s without a done or error event in {path}", file=sys.stderr)
        return 124
    return code


class _Handler(BaseHTTPRequestHandler):
    path_to_events: Path
    stop_event: threading.Event

    def log_message(self, *args) -> None:  # keep the terminal for the progress text
        pass

    def _host_allowed(self) -> bool:
        """Against DNS rebinding (a page whose domain is re-pointed at 127.0.0.1 reads as same-origin):
        answer only requests addressed to this machine's loopback names or the address bound."""
        bound = self.server.server_address[0]
        if bound in ("0.0.0.0", "::", ""):
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        return host in ("localhost", "127.0.0.1", "::1", bound.lower())

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        route = self.path.split("?", 1)[0]
        if not self._host_allowed():
            self._send(403, "text/plain", b"flux_lora watch answers requests to localhost or its bound address only\n")
        elif route == "/events":
            self._stream()
        elif route == "/state":
            self._state()
        elif route in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", DASHBOARD.read_bytes(),
                       {"Content-Security-Policy": _PAGE_POLICY, "Cache-Control": "no-cache"})
        elif route.startswith("/samples/"):
            self._sample(route.removeprefix("/samples/"))
        else:
            self._send(404, "text/plain", b"flux_lora watch: GET / (dashboard), /events (Server-Sent Events), "
                                          b"/state (JSON) or /samples/NAME (a preview image)\n")

    def _send(self, code: int, ctype: str, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _sample(self, name: str) -> None:
        """One image of the run's samples/ folder, by plain file name: no paths, no links out of it."""
        from urllib.parse import unquote

        name = unquote(name)
        folder = self.path_to_events.parent / "samples"
        path = folder / name
        if not _IMAGE_NAME.match(name) or not path.is_file() or path.resolve().parent != folder.resolve():
            self._send(404, "text/plain", b"no such preview image\n")
            return
        self._send(200, _IMAGE_TYPES[path.suffix.lower().lstrip(".")], path.read_bytes(), {"Cache-Control": "no-cache"})

    def _state(self) -> None:
        events = []
        if self.path_to_events.is_file():
            for line in self.path_to_events.read_text(encoding="utf-8").splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        progress = [e for e in events if e.get("event") == "progress"]
        body = {"last_event": events[-1] if events else None, "progress": progress[-1] if progress else None,
                "finished": finished(events) is not None, "exit_code": finished(events), "events": len(events)}
        self._send(200, "application/json", json.dumps(body).encode())

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        seen: list[dict] = []
        last_id = self.headers.get("Last-Event-ID", "")
        already_sent = int(last_id) if last_id.isdigit() else 0  # a browser's reconnect: only what is new
        try:
            self.wfile.write(b"retry: 2000\n\n")
            for ev in follow(self.path_to_events, stop=self.stop_event):
                if ev is None:
                    if finished(seen) is not None:
                        return
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                seen.append(ev)
                if len(seen) <= already_sent:
                    continue
                msg = f"id: {len(seen)}\nevent: {ev.get('event')}\ndata: {json.dumps(ev)}\n\n"
                self.wfile.write(msg.encode())
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return


def serve_events(run_dir: Path, address: str, timeout: float = 0) -> int:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        from flux_lora.errors import ConfigError

        raise ConfigError(f"--serve {address!r} must be HOST:PORT, e.g. 127.0.0.1:8765")
    handler = type("Handler", (_Handler,), {"path_to_events": events_path(run_dir), "stop_event": threading.Event()})
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), handler)
    server.daemon_threads = True
    where = f"http://{host or '127.0.0.1'}:{server.server_address[1]}"
    print(f"serving {handler.path_to_events}: dashboard {where}/  events {where}/events", file=sys.stderr, flush=True)
    try:
        if timeout:
            threading.Timer(timeout, server.shutdown).start()
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        handler.stop_event.set()
        server.server_close()
    return 0
