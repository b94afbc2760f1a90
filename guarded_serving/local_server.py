"""Run the BentoML server as a child process on loopback: for the demo and the tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

SERVICE = "guarded_serving.service:GuardedService"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """``bentoml serve`` on 127.0.0.1, started and stopped by its owner.

    Args:
        env: Extra environment for the server (settings, ``BENTOML_HOME``, ``OTEL_*``).
        port: Port to bind; a free one when 0.
        cwd: Working directory of the server.
        require_ready: Wait for ``/readyz`` to answer 200 rather than just for the
            server to answer at all (a server whose models failed to load is up but
            not ready).
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        port: int = 0,
        cwd: str | Path | None = None,
        require_ready: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.require_ready = require_ready
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="guarded-serving-", suffix=".log")

    def start(self, timeout_s: float = 90.0) -> LocalServer:
        command = [
            sys.executable, "-m", "bentoml", "serve", SERVICE,
            "--host", "127.0.0.1", "--port", str(self.port),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        path = "/readyz" if self.require_ready else "/livez"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not {'ready' if self.require_ready else 'up'}:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's process group; SIGKILL to every descendant if it hangs.

        BentoML starts its workers in sessions of their own, so a group kill alone can
        leave a worker serving: the descendants are listed before signalling.
        """
        if self.process is None or self.process.poll() is not None:
            return
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=5)
        for child in alive:
            try:
                child.kill()
            except psutil.Error:
                continue

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
