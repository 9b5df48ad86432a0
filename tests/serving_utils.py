"""Helpers of the server tests: start `scripts/serve.py` on ports it picks, wait for health."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[1]


# The lines the server logs once each front listens, with the port it bound.
LISTENING = {
    "port": re.compile(r"serving gRPC for .* on \S*:(\d+) \((?:TLS|plaintext)"),
    "http_port": re.compile(r"serving the OpenAI API for .* on https?://\S*:(\d+)/v1 as model"),
    "metrics_port": re.compile(r"serving metrics on http://\S*:(\d+)/metrics"),
}


class ServerProcess:
    """A `scripts/serve.py` subprocess; its log goes to `log_path`. It listens on ports it picks
    (port 0), which `wait_healthy` reads from its log (INFO lines, the default level): two test
    workers that each picked a free port and passed it on could both have been given the same
    one."""

    def __init__(
        self,
        args: list[str],
        log_path: pathlib.Path,
        env: dict | None = None,
        root_cert: bytes | None = None,
    ):
        self.port = self.http_port = self.metrics_port = None  # known once it listens
        fronts = {"--http-port": "http_port", "--metrics-port": "metrics_port"}
        self.fronts = ["port"] + [
            name for flag, name in fronts.items() if any(a.split("=")[0] == flag for a in args)
        ]
        self.log_path = log_path
        self.root_cert = root_cert
        base = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
        base.pop("XLA_FLAGS", None)  # one CPU device is enough for a server (unless `env` says)
        env = {**base, **(env or {})}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(ROOT / "scripts" / "serve.py"),
                    "--port",
                    "0",
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
            )

    @property
    def target(self) -> str:
        return f"localhost:{self.port}" if self.root_cert else f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        if self.root_cert:
            return grpc.secure_channel(self.target, grpc.ssl_channel_credentials(self.root_cert))
        return grpc.insecure_channel(self.target)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float) -> None:
        """Waits until the server logs the port of each front it was asked for, then polls the
        health service until SERVING; fails with the server's log if it died."""
        deadline = time.monotonic() + timeout
        while not self._read_ports() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.5)
        if not self._read_ports():
            self.stop()
            raise TimeoutError(f"server not listening after {timeout}s:\n{self.log()}")
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s:\n{self.log()}")

    def _read_ports(self) -> bool:
        """Reads the ports its log names so far; True once each front's is known."""
        log = self.log()
        for name in self.fronts:
            if getattr(self, name) is None and (found := LISTENING[name].search(log)):
                setattr(self, name, int(found.group(1)))
        return all(getattr(self, name) is not None for name in self.fronts)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL if it does not exit within 60 s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def self_signed_cert(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A certificate for localhost / 127.0.0.1 and its key, made with the openssl CLI."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
