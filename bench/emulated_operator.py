"""The real operator as a subprocess against KMock's emulated API server (shared by benchmarks).

The emulator and simulated KubeRay come from tests/operator/kube_sim.py, the same ones the
operator tests use.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import kmock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from kube_sim import ALL_VERBS, RLHFEmulator, write_kubeconfig  # noqa: E402

OPERATOR = [sys.executable, "-m", "rlhf_operator", "--liveness", "", "--metrics-port", "0"]


@dataclass
class EmulatedOperator:
    api: RLHFEmulator
    workdir: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    stop_first: list[asyncio.Task[None]] = field(default_factory=list)  # cancelled at teardown

    @property
    def process(self) -> subprocess.Popen:
        """The first operator process."""
        return self.processes[0]

    @property
    def log(self) -> Path:
        return self.workdir / "operator.log"

    def start_replica(self, name: str, *args: str) -> subprocess.Popen:
        """An operator process against the API (more than one: e.g. leader election)."""
        with (self.workdir / f"{name}.log").open("a") as log:
            process = subprocess.Popen(
                [*OPERATOR, *args],
                env={**self.env, "POD_NAME": name},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process


@asynccontextmanager
async def emulated_operator(
    interval: float | None, *args: str, emulator: type[RLHFEmulator] = RLHFEmulator
) -> AsyncIterator[EmulatedOperator]:
    """Start the emulator and `python -m rlhf_operator [args]` pointed at it; stop all at exit.

    `interval` overrides the resync interval (RLHF_RESYNC_INTERVAL); None keeps the production
    default. The emulator keeps a short request history: KMock matches each request against
    all recorded ones, which is quadratic over a long benchmark. It serves Leases too (leader
    election).
    """
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    async with emulator(request_history=16) as api, kmock.Server(api) as server:
        api.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
            kind="Lease", namespaced=True, verbs=ALL_VERBS
        )
        kubeconfig = write_kubeconfig(str(server.url).rstrip("/"), workdir / "kubeconfig")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        if interval is not None:
            env["RLHF_RESYNC_INTERVAL"] = str(interval)
        emulated = EmulatedOperator(api, workdir, env)
        emulated.start_replica("operator", *args)
        try:
            yield emulated
        finally:
            for task in emulated.stop_first:
                task.cancel()
            for process in emulated.processes:
                if process.poll() is None:
                    process.terminate()
            for process in emulated.processes:
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
