"""The shared half of the server tests: `mlx-gemma4u serve --demo` as a real process on a free
127.0.0.1 port, raw requests for what the official clients will not send, and a small media
server on 127.0.0.1 for the URL-fetching tests. Every loop here is bounded in count and time."""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from launching import launcher, rank_pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(demo_home, log: Path, *flags: str, model: Path | None = None, launch: int = 0):
    """`mlx-gemma4u serve --demo FLAGS` (or `--model MODEL`) on a free port -> (its URL, its
    process); stopped on exit. Its output (the start-up line, the access log, any traceback) goes to `log`.
    launch: run it as that many processes under `mlx.launch --backend ring` (the process is mlx.launch),
    stopped as a user stops it: SIGTERM to the first process, which tells the others."""
    port = free_port()
    env = {**os.environ, "MLX_GEMMA4U_HOME": str(demo_home)}
    command = [sys.executable, "-m", "mlx_gemma4u", "serve", *(["--model", str(model)] if model else ["--demo"])]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            (launcher(launch) if launch else []) + command + ["--port", str(port), *flags],
            env={**env, "MLX_GEMMA4U_CPU_CORES": "1"} if launch else env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=bool(launch),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # at most a minute
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(log.read_text()) from None
                time.sleep(0.5)
        yield url, process
    finally:
        if process.poll() is None:
            if launch:
                _stop_launched(process, port)
            else:
                process.terminate()
                process.wait(timeout=30)


def _stop_launched(process: subprocess.Popen, port: int) -> None:
    """SIGTERM to rank 0 (the server); the whole group after 30 s if mlx.launch has not ended."""
    first = rank_pid(f"mlx_gemma4u serve .*--port {port}", 0)
    if first is not None:
        os.kill(first, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def post(url: str, path: str, body: bytes, headers: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    """POST raw bytes -> (status, JSON body)."""
    auth = {"authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(
        f"{url}{path}",
        data=body,
        method="POST",
        headers={"content-type": "application/json", **auth, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class MediaServer:
    """An HTTP server on 127.0.0.1 serving `files` (path -> bytes), redirects (path -> location)
    and /drip: a body announced as 100 bytes that comes one byte every half second."""

    def __init__(self, files: dict[str, bytes], redirects: dict[str, str] | None = None):
        self.files, self.redirects = files, redirects or {}
        self.dripping = threading.Event()  # set when a client started reading /drip
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.end_headers()
                elif self.path == "/drip":
                    self._drip()
                elif self.path in server.files:
                    body = server.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def _drip(self):
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                server.dripping.set()
                try:
                    for _ in range(100):  # at most 50 s, and the fetch gives up long before
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
