"""`apix serve` with no server settings: embedded PostgreSQL and Redis, clean stop, data kept."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    env.update({"APIX_DATA_DIR": str(data_dir), "APIX_SERVER__PORT": str(port)})
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "apix", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=data_dir.parent,
        )


def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"not ready in time:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes], log: Path) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"did not stop after SIGTERM:\n{log.read_text()}")
    assert code == 0, log.read_text()


def test_serve_on_embedded_servers_then_stop_cleanly_and_reuse_the_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    first_log = tmp_path / "first.log"
    process = start(data_dir, port, first_log)
    try:
        wait_ready(base, process, first_log)
        status = httpx.get(f"{base}/api/v1/status", timeout=10).json()
        assert status["status"] == "ok"
        assert status["postgres"] | {"latency_ms": 0} == {
            "ok": True,
            "embedded": True,
            "latency_ms": 0,
            "version": status["postgres"]["version"],
            "error": None,
        }
        assert status["postgres"]["version"].startswith("16")
        assert status["redis"]["ok"] is True
        assert status["redis"]["embedded"] is True
        assert status["migrations"]["up_to_date"] is True
        docs = httpx.get(f"{base}/api/docs", timeout=10).text
        assert "https://" not in docs
        assert "http://" not in docs
    finally:
        if process.poll() is None:
            stop(process, first_log)
    output = first_log.read_text()
    assert str(data_dir.resolve()) in output  # where the data lives
    assert f"http://127.0.0.1:{port}/api/docs" in output
    assert "Running upgrade" in output
    assert not _embedded_processes(data_dir), "embedded servers left running"

    second_log = tmp_path / "second.log"
    process = start(data_dir, port, second_log)
    try:
        wait_ready(base, process, second_log)
        assert httpx.get(f"{base}/api/v1/status", timeout=10).json()["status"] == "ok"
    finally:
        if process.poll() is None:
            stop(process, second_log)
    assert "Running upgrade" not in second_log.read_text()  # same data, already migrated
    assert not _embedded_processes(data_dir)


def _embedded_processes(data_dir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [
        line
        for line in out.splitlines()
        if str(data_dir.resolve()) in line and "pytest" not in line
    ]


def test_serve_with_two_workers_shares_the_embedded_servers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "workers.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    env.update({"APIX_DATA_DIR": str(data_dir), "APIX_SERVER__PORT": str(port)})
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "apix", "serve", "--workers", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        wait_ready(base, process, log)
        # Requests land on both worker processes; each reaches the same embedded servers.
        for _ in range(6):
            status = httpx.get(f"{base}/api/v1/status", timeout=10).json()
            assert status["status"] == "ok"
            assert status["postgres"]["embedded"] is True
            assert status["redis"]["embedded"] is True
    finally:
        if process.poll() is None:
            stop(process, log)
    assert log.read_text().count("Started server process") == 2
    assert not _embedded_processes(data_dir)
