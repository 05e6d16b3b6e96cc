"""Processes the harness starts, and what it measures on them (CPU time, RSS).

Every process is started in its own session (process group) and stopped through it:
SIGTERM to the group, SIGKILL after a timeout. `Registry.stop_all` runs at exit, so nothing
the harness started outlives it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


class HarnessError(RuntimeError):
    pass


def raise_fd_limit() -> int:
    """Raise this process's open-files soft limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Proc:
    """A child process in its own process group, with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipe: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("ab")
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.popen = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else self._log_file,
            stderr=self._log_file,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        REGISTRY.add(self)
        if pipe:
            threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                self._log_file.write(raw)
                self._log_file.flush()

    def send(self, message: dict[str, Any]) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(message) + "\n").encode())
        self.popen.stdin.flush()

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        """The next stdout message named ``event`` (others are skipped), within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(
                    f"{self.name}: no {event!r} within {timeout:.0f}s (see {self.log})"
                )
            try:
                message = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    raise HarnessError(
                        f"{self.name} exited with {self.popen.returncode} (see {self.log})"
                    ) from None
                continue
            if message.get("event") == event:
                return message
            if message.get("event") in ("error", "timeout"):
                raise HarnessError(f"{self.name}: {message}")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group, then SIGKILL; bounded by ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Children that left the group's leader behind (same group id) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log_file.close()
        REGISTRY.discard(self)


class Registry:
    def __init__(self) -> None:
        self._procs: list[Proc] = []
        self._lock = threading.Lock()

    def add(self, proc: Proc) -> None:
        with self._lock:
            self._procs.append(proc)

    def discard(self, proc: Proc) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            with contextlib.suppress(Exception):
                proc.stop(timeout=10)


REGISTRY = Registry()
atexit.register(REGISTRY.stop_all)


def _tree(pids: Iterable[int]) -> list[psutil.Process]:
    seen: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                seen.setdefault(proc.pid, proc)
        except psutil.NoSuchProcess:
            continue
    return list(seen.values())


def cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time (user + system) of the process trees rooted at ``pids``, waited-for children too."""
    total = 0.0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def context_switches(pids: Iterable[int]) -> tuple[int, int]:
    """Voluntary and involuntary context switches of the process trees rooted at ``pids``."""
    voluntary = involuntary = 0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            switches = proc.num_ctx_switches()
            voluntary += switches.voluntary
            involuntary += switches.involuntary
    return voluntary, involuntary


def wait_idle(pids: list[int], *, timeout_s: float, cores: float = 0.05) -> None:
    """Wait until the process trees use less than ``cores`` over half a second (start-up
    done), or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    before = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pids)
        if now - before < cores * 0.5:
            return
        before = now


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for proc in _tree(pids):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


def process_count(pids: Iterable[int]) -> int:
    return len(_tree(pids))


@dataclass
class CpuWindow:
    """CPU seconds of some process trees between `start()` and `stop()`."""

    pids: list[int]
    started_cpu: float = 0.0
    started_at: float = 0.0
    started_switches: tuple[int, int] = (0, 0)
    cpu: float = 0.0
    wall: float = 0.0
    # Voluntary (waited for input) and involuntary (preempted while runnable) switches: many
    # of the second say the processes fought over the cores.
    switches: tuple[int, int] = (0, 0)

    def start(self) -> CpuWindow:
        self.started_cpu = cpu_seconds(self.pids)
        self.started_switches = context_switches(self.pids)
        self.started_at = time.monotonic()
        return self

    def stop(self) -> CpuWindow:
        self.cpu = cpu_seconds(self.pids) - self.started_cpu
        self.wall = time.monotonic() - self.started_at
        voluntary, involuntary = context_switches(self.pids)
        self.switches = (
            voluntary - self.started_switches[0],
            involuntary - self.started_switches[1],
        )
        return self


def wait_port(host: str, port: int, timeout: float, proc: Proc | None = None) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise HarnessError(f"{proc.name} exited early (see {proc.log})")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.1)
    raise HarnessError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
