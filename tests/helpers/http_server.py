"""`lora-ckpt serve` in a subprocess on loopback, for tests with a real HTTP client."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``lora-ckpt serve --store STORE *extra`` on 127.0.0.1 and a free port."""

    def __init__(self, store_path: str, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "lora_ckpt.cli", "serve", "--store", store_path]
        # A file, not a pipe: nobody reads a pipe while the server runs, and a
        # full one would block the server's logging.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115  (closed by stop())
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *extra],
            env=dict(ENV, **(env or {})),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        """What the server printed so far."""
        self.log.seek(0)
        return self.log.read()

    def wait(self, path: str = "/ready", status: int = 200, timeout: float = 120) -> None:
        """Waits until ``path`` answers ``status`` (raises if the server dies or times out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} never answered {status}")

    def stacks(self) -> str:
        """The server's log followed by every thread's stack (``serve`` dumps them on SIGUSR1)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
        return self.output()[-20000:]

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=40)  # a draining server answers what it accepted first
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()
