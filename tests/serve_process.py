"""A blob-serve process for the server tests: the demo model on a free loopback port, started as
its users start it (python -m blobstore.runtime.serve) and stopped by its id."""
import os
import signal
import socket
import subprocess
import tempfile
import sys
import time

import httpx

START_TIMEOUT_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "blobstore.runtime.serve", "--port", str(self.port),
                                         "--threads", "1", *args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        cwd=tempfile.gettempdir())  # not the checkout: its blobstore/
        # source folder (no compiled extension) would shadow the installed package on `python -m`
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"blob-serve exited with {self.process.returncode}: {self.process.stderr.read()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"blob-serve did not answer /health within {START_TIMEOUT_SECONDS} s")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            line = next(line for line in status if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def signal(self, number=signal.SIGTERM) -> None:
        os.kill(self.process.pid, number)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stderr.close()
