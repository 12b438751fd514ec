"""Run the app in a child process on a free port (for tests and smoke checks).

Example::

    with AppProcess(["--ranks", "2"]) as app:
        Client(app.url).predict(..., api_name="/generate")
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from launcher.topology import free_port

ROOT = Path(__file__).resolve().parent.parent


class AppProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.env = dict(os.environ, GRADIO_SERVER_PORT=str(self.port), GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
        self.env.pop("RANK", None)
        self.log = tempfile.NamedTemporaryFile(prefix="parastep-app-", suffix=".log", delete=False)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 420.0) -> AppProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"the app did not serve {self.url} within {timeout_s:.0f} s:\n{self.log_tail()}")

    def peer_pids(self) -> list[int]:
        """Processes spawned by the app (its peer ranks)."""
        assert self.proc is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                pids.append(int(entry.name))
        return sorted(pids)

    def log_tail(self, chars: int = 6000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> AppProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


_shared: dict[tuple[str, ...], AppProcess] = {}


def shared_app(args: list[str]) -> AppProcess:
    """One app per argument list for the whole test session (several test modules share it)."""
    key = tuple(args)
    if key not in _shared:
        app = AppProcess(args).start()
        _shared[key] = app
        atexit.register(app.stop)
    return _shared[key]
