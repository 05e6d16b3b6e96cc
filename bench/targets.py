"""The servers under test: APIX (one or two nodes) and the four baselines.

Each target starts its own processes on loopback, says where its WebSocket (and HTTP
publish endpoint, if any) is, which process trees are "the server" for CPU and memory,
and stops everything it started.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.procs import HarnessError, Proc, free_port, wait_idle, wait_port

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "bench" / "node"
# One server process stays under the 20,000 open-files limit with room to spare (workers
# sharing one listening socket are not balanced exactly).
CONNECTIONS_PER_PROCESS = 15_000


def server_processes(connections: int) -> int:
    return max(1, math.ceil(connections / CONNECTIONS_PER_PROCESS))


@dataclass
class Target:
    key: str
    label: str
    dialect: str = "apix"
    http_publish: bool = False
    procs: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    token: str = "bench"  # noqa: S105 - baselines ignore it

    # --- life cycle ---------------------------------------------------------------------
    def start(self, workdir: Path, *, processes: int = 1, nodes: int = 1) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        self.ports.clear()

    def close(self) -> None:
        """End of the run: stop whatever outlives one scenario."""
        self.stop()

    # --- where and what -----------------------------------------------------------------
    def ws_urls(self) -> list[str]:
        raise NotImplementedError

    def http_url(self, channel: str, credential: str = "token") -> tuple[str, dict[str, str]]:
        """Where to publish to ``channel`` over HTTP, and the headers to send. APIX
        authenticates with its access token, or an API key with ``credential="api_key"``
        (the baselines check neither)."""
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def aux_pids(self) -> list[int]:
        """Servers the target needs besides its own processes (APIX: Redis, PostgreSQL)."""
        return list(self.aux_parts().values())

    def aux_parts(self) -> dict[str, int]:
        """The same servers by name, for reporting each one's share."""
        return {}

    def main_pid(self) -> int:
        return self.procs[0].pid


class PythonBaseline(Target):
    def __init__(self, key: str, label: str, module: str, **kw: Any) -> None:
        super().__init__(key, label, **kw)
        self.module = module
        self.path = "/ws" if key == "fastapi" else "/"

    def start(self, workdir: Path, *, processes: int = 1, nodes: int = 1) -> None:
        port = free_port()
        base = [sys.executable, "-m", self.module, "--port", str(port)]
        if self.key == "websockets":
            # Several copies on one port (SO_REUSEPORT), each under the open-files limit.
            argvs = [base + (["--reuse-port"] if processes > 1 else []) for _ in range(processes)]
        else:
            argvs = [[*base, "--procs", str(processes)]]  # uvicorn workers
        for i, argv in enumerate(argvs):
            log = workdir / f"{self.key}.log"
            self.procs.append(Proc(f"{self.key}-{i}", argv, log=log, cwd=ROOT))
        self.ports = [port]
        for proc in self.procs:
            wait_port("127.0.0.1", port, 30, proc)
        time.sleep(0.5 if processes == 1 else 2.0)  # every copy or worker listening

    def ws_urls(self) -> list[str]:
        if self.dialect == "sio":
            return [f"ws://127.0.0.1:{self.ports[0]}/socket.io/"]
        return [f"ws://127.0.0.1:{self.ports[0]}{self.path}"]

    def http_url(self, channel: str, credential: str = "token") -> tuple[str, dict[str, str]]:
        return f"http://127.0.0.1:{self.ports[0]}/publish/{channel}", {}


class NodeBaseline(Target):
    def start(self, workdir: Path, *, processes: int = 1, nodes: int = 1) -> None:
        port = free_port()
        env = dict(os.environ, NODE_PATH=str(NODE_DIR / "node_modules"))
        argv = ["node", str(ROOT / "bench/baselines/ws_node.js"), "--port", str(port)]
        argv += ["--procs", str(processes)]
        self.procs.append(Proc(self.key, argv, log=workdir / f"{self.key}.log", env=env))
        self.ports = [port]
        wait_port("127.0.0.1", port, 30, self.procs[0])
        time.sleep(0.3 if processes == 1 else 1.5)

    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{self.ports[0]}/"]

    def http_url(self, channel: str, credential: str = "token") -> tuple[str, dict[str, str]]:
        return f"http://127.0.0.1:{self.ports[0]}/publish/{channel}", {}


class Apix(Target):
    """`apix serve` nodes on embedded PostgreSQL and Redis that the harness starts once."""

    PASSWORD = "bench-password-123"  # noqa: S105 - a throwaway org on a temp database

    def __init__(self, **kw: Any) -> None:
        super().__init__("apix", "APIX", http_publish=True, **kw)
        self.embedded: Any = None
        self.database_url = ""
        self.redis_url = ""
        self.servers_dir: Path | None = None
        self.org_slug = ""
        self.email = ""
        self.worker: Proc | None = None

    def _ensure_servers(self, workdir: Path) -> None:
        if self.embedded is not None:
            return
        from apix.infra.embedded import EmbeddedServers

        self.servers_dir = workdir / "apix-servers"
        self.embedded = EmbeddedServers(self.servers_dir)
        database_url, redis_url = self.embedded.start(need_postgres=True, need_redis=True)
        assert database_url is not None
        assert redis_url is not None
        self.database_url, self.redis_url = database_url, redis_url

    def _env(self, workdir: Path, name: str, port: int, workers: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
        env.update(
            {
                "APIX_ENV": "development",
                "APIX_DATABASE_URL": self.database_url,
                "APIX_REDIS_URL": self.redis_url,
                "APIX_NODE_ID": name,
                "APIX_DATA_DIR": str(workdir / name),
                "APIX_AUTH__KEYS_DIR": str(workdir / "apix-keys"),  # shared, as in production
                "APIX_SERVER__PORT": str(port),
                "APIX_SERVER__WORKERS": str(workers),
                "APIX_LOG__LEVEL": "WARNING",
                # The benchmark publishes far faster than one client may by default.
                "APIX_REALTIME__PUBLISHES_PER_SECOND": "1000000",
                "APIX_REALTIME__COMMANDS_PER_SECOND": "1000000",
                "APIX_REALTIME__COMMAND_BURST": "1000000",
                "APIX_AUTH__LOGIN_FAILURES_PER_IP": "10000",
                "APIX_AUTH__ACCESS_TTL_S": "7200",
                # As in production: the nodes serve, one `apix worker` archives (see aux).
                "APIX_WORKER__EMBEDDED": "false",
                "APIX_MONITORING__METRICS_TOKEN": "bench",
            }
        )
        # Experiments: BENCH_APIX_X=v sets APIX_X=v on the nodes (and the worker).
        env.update(
            {k[len("BENCH_") :]: v for k, v in os.environ.items() if k.startswith("BENCH_APIX_")}
        )
        return env

    def start(self, workdir: Path, *, processes: int = 1, nodes: int = 1) -> None:
        self._ensure_servers(workdir)
        (workdir / "apix-keys").mkdir(exist_ok=True)
        for n in range(nodes):
            name = f"bench-node-{'ab'[n]}"
            port = free_port()
            argv = [sys.executable, "-m", "apix", "serve"]
            env = self._env(workdir, name, port, processes)
            proc = Proc(name, argv, log=workdir / f"{name}.log", env=env, cwd=workdir)
            self.procs.append(proc)
            self.ports.append(port)
            self._wait_ready(proc, port)  # the first node creates the shared signing key
        argv = [sys.executable, "-m", "apix", "worker", "--consumer", "bench-worker"]
        env = self._env(workdir, "bench-worker", 0, 1)
        log = workdir / "bench-worker.log"
        self.worker = Proc("bench-worker", argv, log=log, env=env, cwd=workdir)
        self.token = self._login()
        # Until the worker has imported everything and claimed its partitions it burns a
        # core, which the first scenario would otherwise measure as APIX's cost.
        wait_idle([self.worker.pid, *self.server_pids()], timeout_s=90)

    def _wait_ready(self, proc: Proc, port: int) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if not proc.alive():
                raise HarnessError(f"{proc.name} exited (see {proc.log})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise HarnessError(f"{proc.name} not ready after 90 s (see {proc.log})")

    def _login(self) -> str:
        base = f"http://127.0.0.1:{self.ports[0]}/api/v1"
        with httpx.Client(base_url=base, timeout=30) as http:
            if not self.org_slug:
                self.org_slug = f"bench-{uuid.uuid4().hex[:8]}"
                self.email = f"{self.org_slug}@example.com"
                body = {
                    "email": self.email,
                    "password": self.PASSWORD,
                    "name": "Bench",
                    "organization_name": "Bench",
                    "organization_slug": self.org_slug,
                }
                created = http.post("/auth/register", json=body)
                if created.status_code != 201:
                    raise HarnessError(f"register failed: {created.status_code} {created.text}")
            tokens = http.post("/auth/login", json={"email": self.email, "password": self.PASSWORD})
            if tokens.status_code != 200:
                raise HarnessError(f"login failed: {tokens.status_code} {tokens.text}")
            return str(tokens.json()["access_token"])

    def ws_urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/api/v1/apix/ws" for port in self.ports]

    def http_url(self, channel: str, credential: str = "token") -> tuple[str, dict[str, str]]:
        url = f"http://127.0.0.1:{self.ports[0]}/api/v1/apix/channels/{channel}/events"
        secret = self._api_key() if credential == "api_key" else self.token
        return url, {"authorization": f"Bearer {secret}"}

    def _api_key(self) -> str:
        """A developer's API key of the benchmark's organisation (how services publish)."""
        base = f"http://127.0.0.1:{self.ports[0]}/api/v1"
        headers = {"authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=base, timeout=30, headers=headers) as http:
            body = {"name": f"bench-{uuid.uuid4().hex[:8]}", "role": "DEVELOPER"}
            created = http.post("/admin/api-keys", json=body)
            if created.status_code != 201:
                raise HarnessError(f"API key failed: {created.status_code} {created.text}")
            return str(created.json()["key"])

    def aux_parts(self) -> dict[str, int]:
        """Redis, PostgreSQL and the `apix worker` archiving the events."""
        parts: dict[str, int] = {}
        if self.worker is not None and self.worker.alive():
            parts["worker"] = self.worker.pid
        if self.embedded is None:
            return parts
        with contextlib.suppress(Exception):
            parts["redis"] = int(self.embedded.redis._process.pid)
        with contextlib.suppress(Exception):
            parts["postgres"] = int(self.embedded.postgres._server.get_pid())
        return parts

    def worker_pids(self) -> list[int]:
        """The processes that run the gateway (uvicorn workers, or the node itself)."""
        import psutil

        pids: list[int] = []
        for proc in self.procs:
            children = [
                c
                for c in psutil.Process(proc.pid).children()
                if "python" in (c.name() or "") and "resource_tracker" not in " ".join(c.cmdline())
            ]
            pids.extend(c.pid for c in children) if children else pids.append(proc.pid)
        return pids

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None
        super().stop()

    def close(self) -> None:
        self.stop()
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                self.embedded.stop()
            self.embedded = None


def all_targets() -> dict[str, Target]:
    return {
        "apix": Apix(),
        "websockets": PythonBaseline(
            "websockets", "bare websockets", "bench.baselines.ws_websockets"
        ),
        "fastapi": PythonBaseline(
            "fastapi", "bare FastAPI/uvicorn", "bench.baselines.ws_fastapi", http_publish=True
        ),
        "socketio": PythonBaseline(
            "socketio", "python-socketio", "bench.baselines.ws_socketio", dialect="sio"
        ),
        "node-ws": NodeBaseline("node-ws", "Node ws", http_publish=True),
    }
