"""`flux_lora watch DIR`: follow a run's events.jsonl from anywhere that can read it, and
`--serve HOST:PORT`: the same stream over HTTP as Server-Sent Events.

    GET /events   text/event-stream: every event so far, then live ones; ends after done/error
    GET /state    the latest state as JSON (last progress, last event, finished or not)

Works before the run starts (waits for the file) and after it ended (replays, then exits).
Exit codes: 0 after `done`, 1 after `error`, 3 after `stopped` (resumable), 124 on --timeout.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

from flux_lora.outputs.display import Display, progress_line

TERMINAL = {"done": 0, "error": 1, "stopped": 3}
POLL_S = 0.2


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


def finished(events: list[dict]) -> int | None:
    """Exit code of the last terminal event, unless a later start shows the run going on."""
    code = None
    for ev in events:
        if ev.get("event") == "start":
            code = None
        elif ev.get("event") in TERMINAL:
            code = TERMINAL[ev["event"]]
    return code


def watch_events(run_dir: Path, timeout: float = 0) -> int:
    path = events_path(run_dir)
    if not path.is_file():
        print(f"waiting for {path} ...", file=sys.stderr, flush=True)
    display, state, code = None, None, None
    for ev in follow(path, timeout):
        if ev is None:
            if code is not None:
                break
            continue
        kind = ev.get("event")
        if kind == "start":
            code = None
            if display:
                display.close()
            total = ev.get("total_steps") or ev.get("dataset_size") or 0
            display = Display(total, ev.get("stage", "run"), every=1)
            display.message(f"{ev.get('stage')} started: world size {ev.get('world_size')}, "
                            f"{ev.get('dataset_size')} items" + (f", from step {ev['start_step']}" if ev.get("start_step") else ""))
        elif kind == "progress":
            state = ev
            if display:
                display.update(ev.get("step") or ev.get("done") or 0, ev)
        elif kind in ("warning", "error", "stopped"):
            (display.message if display else print)(f"{kind}: {ev.get('message', '')}")
        elif kind in ("checkpoint", "sample"):
            (display.message if display else print)(f"{kind} at step {ev.get('step')}: {ev.get('path')}")
        if kind in TERMINAL:
            code = TERMINAL[kind]
            if kind == "done":
                summary = progress_line(state) if state else "done"
                (display.message if display else print)(f"done: {summary}")
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

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/events"):
            self._stream()
        elif self.path.startswith("/state"):
            self._state()
        else:
            self._send(200, "text/plain", b"flux_lora watch: GET /events (Server-Sent Events) or /state (JSON)\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(body)

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
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        seen: list[dict] = []
        try:
            for ev in follow(self.path_to_events, stop=self.stop_event):
                if ev is None:
                    if finished(seen) is not None:
                        return
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                    continue
                seen.append(ev)
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
    print(f"serving {handler.path_to_events} on http://{host or '127.0.0.1'}:{server.server_address[1]}/events",
          file=sys.stderr, flush=True)
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
