"""A FAKE Kubernetes API server with cert-manager behind it, for what cannot run here (no cluster):
just enough of cert-manager.io/v1 CertificateRequests for `orchctl certs request`, over real HTTP
on loopback.

- POST   /apis/cert-manager.io/v1/namespaces/NS/certificaterequests        create (generateName)
- GET    /apis/cert-manager.io/v1/namespaces/NS/certificaterequests/NAME   one request
- DELETE /apis/cert-manager.io/v1/namespaces/NS/certificaterequests/NAME   delete it

A request stays pending for `pending_gets` reads, then is decided as `decision` says: "issue" signs
the CSR as it stands with the CA of an `orchctl certs` directory (as a CA issuer does: its SANs,
status.ca set), "deny" marks it Denied, "no-ca" issues without status.ca, "pending" never decides.
Nothing else: no auth, no approval, no other kinds.
"""

from __future__ import annotations

import base64
import datetime
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tests.fakes.kube_http import JsonHandler

PREFIX = ["apis", "cert-manager.io", "v1", "namespaces"]


class FakeCertManager:
    def __init__(self, ca_dir: Path, decision: str = "issue", pending_gets: int = 2) -> None:
        self.ca_dir = ca_dir
        self.decision = decision
        self.pending_gets = pending_gets
        self.created: list[dict[str, Any]] = []  # every request as created
        self.requests: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, name) -> the live ones
        self._gets: dict[tuple[str, str], int] = {}
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-cert-manager", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeCertManager:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _decide(self, request: dict[str, Any]) -> None:
        if self.decision == "pending":
            return
        if self.decision == "deny":
            request["status"] = {"conditions": [
                {"type": "Denied", "status": "True", "reason": "PolicyDenied", "message": "not allowed by policy"},
                {"type": "Ready", "status": "False", "reason": "Denied", "message": "denied"}]}
            return
        certificate = self._sign(base64.b64decode(request["spec"]["request"]))
        status: dict[str, Any] = {"certificate": base64.b64encode(certificate).decode(),
                                  "conditions": [{"type": "Approved", "status": "True"},
                                                 {"type": "Ready", "status": "True", "reason": "Issued"}]}
        if self.decision != "no-ca":
            status["ca"] = base64.b64encode((self.ca_dir / "ca.pem").read_bytes()).decode()
        request["status"] = status

    def _sign(self, csr_pem: bytes) -> bytes:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        csr = x509.load_pem_x509_csr(csr_pem)
        ca_key = serialization.load_pem_private_key((self.ca_dir / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((self.ca_dir / "ca.pem").read_bytes())
        now = datetime.datetime.now(datetime.UTC)
        builder = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca_cert.subject)
                   .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension in csr.extensions:
            builder = builder.add_extension(extension.value, critical=extension.critical)
        cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        return cert.public_bytes(serialization.Encoding.PEM)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(JsonHandler):
            def _key(self) -> tuple[str, str] | None:
                parts = urlparse(self.path).path.strip("/").split("/")
                if parts[:4] != PREFIX or len(parts) != 7 or parts[5] != "certificaterequests":
                    return None
                return parts[4], parts[6]

            def do_POST(self) -> None:
                parts = urlparse(self.path).path.strip("/").split("/")
                if parts[:4] != PREFIX or len(parts) != 6 or parts[5] != "certificaterequests":
                    return self._not_found()
                body = self._body()
                with fake._lock:
                    name = body["metadata"].get("name") or f"{body['metadata']['generateName']}{next(fake._names)}"
                    body["metadata"] = {**body["metadata"], "name": name, "namespace": parts[4]}
                    fake.created.append(json.loads(json.dumps(body)))
                    fake.requests[(parts[4], name)] = body
                self._send(201, body)

            def do_GET(self) -> None:
                key = self._key()
                with fake._lock:
                    request = fake.requests.get(key) if key else None
                    if request is None or key is None:
                        return self._not_found()
                    fake._gets[key] = fake._gets.get(key, 0) + 1
                    if fake._gets[key] > fake.pending_gets and "status" not in request:
                        fake._decide(request)
                    self._send(200, request)

            def do_DELETE(self) -> None:
                key = self._key()
                with fake._lock:
                    if key is None or fake.requests.pop(key, None) is None:
                        return self._not_found()
                self._send(200, {"kind": "Status", "status": "Success"})

        return Handler
