"""A real HTTPS server on loopback serving MTA-STS policies (mta-sts.<domain>), with a
certificate from a trustme CA, and answers tests can change while it runs::

    server = PolicyServer(ca, ["remote.test"])
    server.start()
    server.set("remote.test", POLICY)                    # 200 text/plain
    server.set("remote.test", status=301, location="https://elsewhere.test/")
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import trustme


@dataclass
class PolicyResponse:
    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    location: str | None = None
    send_length: bool = True  # False: no Content-Length, the body ends at the close
    delay: float = 0.0  # seconds to wait before answering


@dataclass
class Request:
    host: str  # the Host header, without a port
    path: str


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def handle(self) -> None:
        # The TLS handshake happens here, in the connection's thread, so that a client
        # refusing our certificate does not disturb the accepting thread.
        try:
            self.request.do_handshake()
        except (ssl.SSLError, OSError):
            return
        with contextlib.suppress(OSError):
            super().handle()

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(Request(host, self.path))
            domain = host.removeprefix("mta-sts.")
            response = owner.responses.get(domain)
        if response is None or self.path != "/.well-known/mta-sts.txt":
            response = PolicyResponse(b"not found\n", status=404)
        if response.delay:
            time.sleep(response.delay)
        self.send_response(response.status)
        if response.content_type is not None:
            self.send_header("Content-Type", response.content_type)
        if response.location is not None:
            self.send_header("Location", response.location)
        if response.send_length:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: PolicyServer, address: tuple[str, int],
                 context: ssl.SSLContext):
        self.owner = owner
        self.context = context
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, peer = self.socket.accept()
        sock.settimeout(10)
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), peer


@dataclass
class PolicyServer:
    """HTTPS for mta-sts.<domain> of each domain, on ``host``:``port`` (0: any free)."""

    ca: trustme.CA
    domains: list[str]
    host: str = "127.0.0.1"
    port: int = 0
    responses: dict[str, PolicyResponse] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    def set(self, domain: str, body: str | bytes = b"", **options: object) -> None:
        data = body.encode() if isinstance(body, str) else body
        with self.lock:
            self.responses[domain] = PolicyResponse(data, **options)  # type: ignore[arg-type]

    def count(self, domain: str) -> int:
        """How many requests reached mta-sts.<domain>."""
        with self.lock:
            return sum(1 for r in self.requests if r.host == f"mta-sts.{domain}")

    def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*(f"mta-sts.{d}" for d in self.domains)).configure_cert(context)
        self._server = _Server(self, (self.host, self.port), context)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"https-{self.host}:{self.port}")
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
