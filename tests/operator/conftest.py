"""Fixtures for operator tests: the emulated API server, simulated KubeRay, the real operator.

The pieces live in kube_sim.py (reusable by other tests and by bench/); here they are wired as
pytest fixtures. The operator reacts to watch events; its only timer, the resync of running jobs
(RLHF_RESYNC_INTERVAL), is 60 s here: longer than any scenario waits, so every scenario that
finishes proves the event path.
"""

from __future__ import annotations

import os

# The resync interval (60 s), the sweep interval and one kubeconfig path for the session are
# set by tests/conftest.py, before anything imports the operator or the kubernetes client.
KUBECONFIG = os.environ["KUBECONFIG"]

from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import kmock  # noqa: E402
import pytest  # noqa: E402
from kube_sim import (  # noqa: E402
    GarbageCollector,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    write_kubeconfig,
)


@pytest.fixture()
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RLHFEmulator]:
    """The emulated API server; $KUBECONFIG points at it for kopf and the kubernetes client."""
    async with RLHFEmulator() as emulator, kmock.Server(emulator) as server:
        write_kubeconfig(str(server.url).rstrip("/"), Path(KUBECONFIG))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator
        emulator.release_all()


@pytest.fixture()
async def gc(api: RLHFEmulator) -> AsyncIterator[GarbageCollector]:
    """Kubernetes' garbage collector: children of a deleted owner go, late (`gc.paused`)."""
    async with GarbageCollector(api) as collector:
        yield collector


@pytest.fixture()
async def kuberay(api: RLHFEmulator, gc: GarbageCollector) -> AsyncIterator[SimulatedKubeRay]:
    """Simulated KubeRay; set `kuberay.plan` to script how RayJobs end (default: succeed)."""
    async with SimulatedKubeRay(api) as sim:
        yield sim


@pytest.fixture()
async def operator(api: RLHFEmulator, kuberay: SimulatedKubeRay) -> AsyncIterator[OperatorRunner]:
    """The real operator, running until the test ends (`await operator.stop()/start()` restarts).

    Teardown stops it completely (see `OperatorRunner`), after letting go of any request the
    test still held (a tripwire or gate of a failed test): a handler thread blocked on one
    would otherwise hold the stop.
    """
    runner = OperatorRunner()
    await runner.start()
    yield runner
    api.release_all()
    await runner.stop()
