"""Two "hosts" on one machine: two network namespaces joined by a veth pair, each with its own hostname.

    with TwoHosts() as hosts:                  # creates them, removes them on exit, whatever happened
        hosts.popen(0, cmd, env)               # runs cmd on host A (10.213.N.1, hostname dclm-a-PID)

The addresses exist only inside the two namespaces, so no traffic leaves them. Names carry the pid, so
concurrent test sessions do not collide. `TwoHosts.unavailable()` says why they cannot be made here
(not root, no `ip`, no network-namespace support), for a skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


class TwoHosts:
    def __init__(self) -> None:
        pid = os.getpid()
        self.subnet = f"10.213.{pid % 250 + 1}"
        self.ns = [f"dclmA{pid}", f"dclmB{pid}"]
        self.ifname = [f"dcA{pid}"[:15], f"dcB{pid}"[:15]]
        self.addr = [f"{self.subnet}.1", f"{self.subnet}.2"]
        self.hostname = [f"dclm-a-{pid}", f"dclm-b-{pid}"]
        self.uts = shutil.which("unshare") is not None

    @staticmethod
    def unavailable() -> str | None:
        if shutil.which("ip") is None:
            return "the `ip` command (iproute2) is not installed"
        if os.geteuid() != 0:
            return "creating network namespaces needs root"
        probe = f"dclmprobe{os.getpid()}"
        made = _ip("netns", "add", probe)
        if made.returncode != 0:
            return f"`ip netns add` failed here: {made.stderr.strip()}"
        _ip("netns", "del", probe)
        return None

    def __enter__(self) -> "TwoHosts":
        try:
            steps = [
                ("netns", "add", self.ns[0]), ("netns", "add", self.ns[1]),
                ("link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1]),
            ]
            for i in (0, 1):
                steps += [("link", "set", self.ifname[i], "netns", self.ns[i]),
                          ("-n", self.ns[i], "addr", "add", f"{self.addr[i]}/24", "dev", self.ifname[i]),
                          ("-n", self.ns[i], "link", "set", self.ifname[i], "up"),
                          ("-n", self.ns[i], "link", "set", "lo", "up")]
            for step in steps:
                done = _ip(*step)
                if done.returncode != 0:
                    raise RuntimeError(f"ip {' '.join(step)}: {done.stderr.strip()}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.ns:  # deleting a namespace deletes its end of the veth pair, and so the pair
            _ip("netns", "del", ns)
        _ip("link", "del", self.ifname[0])  # in case it never moved into its namespace

    def wrap(self, host: int, cmd: list[str]) -> list[str]:
        """cmd run on `host` (0 = A, 1 = B): inside its namespace, under its own hostname."""
        inner = list(cmd)
        if self.uts:
            inner = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', self.hostname[host], *inner]
        return ["ip", "netns", "exec", self.ns[host], *inner]

    def popen(self, host: int, cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
        with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(self.wrap(host, cmd), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
