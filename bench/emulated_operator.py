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
from dataclasses import dataclass
from pathlib import Path

import kmock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from kube_sim import RLHFEmulator, write_kubeconfig  # noqa: E402


@dataclass
class EmulatedOperator:
    api: RLHFEmulator
    process: subprocess.Popen
    log: Path


@asynccontextmanager
async def emulated_operator(interval: float | None) -> AsyncIterator[EmulatedOperator]:
    """Start the emulator and `python -m rlhf_operator` pointed at it; stop both at exit.

    `interval` overrides the reconcile interval (RLHF_RECONCILE_INTERVAL); None keeps the
    production default. The emulator keeps a short request history: KMock matches each request
    against all recorded ones, which is quadratic over a long benchmark.
    """
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    async with RLHFEmulator(request_history=16) as api, kmock.Server(api) as server:
        kubeconfig = write_kubeconfig(str(server.url).rstrip("/"), workdir / "kubeconfig")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        if interval is not None:
            env["RLHF_RECONCILE_INTERVAL"] = str(interval)
        log_path = workdir / "operator.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "rlhf_operator", "--liveness", "", "--metrics-port", "0"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                yield EmulatedOperator(api, process, log_path)
            finally:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
