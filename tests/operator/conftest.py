"""Fixtures for operator tests: the emulated API server, simulated KubeRay, the real operator.

The pieces live in kube_sim.py (reusable by other tests and by bench/); here they are wired as
pytest fixtures. The operator's timer ticks every 0.1 s here (RLHF_RECONCILE_INTERVAL, read when
rlhf_operator.settings is first imported), so scenarios finish in seconds.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RLHF_RECONCILE_INTERVAL", "0.1")
os.environ.setdefault("RLHF_POOL_SWEEP_INTERVAL", "0.2")  # warm-pool expiry sweep
# One kubeconfig path for the session, rewritten per test: kopf's default login reads the path
# that $KUBECONFIG had when the kubernetes client was first imported.
KUBECONFIG = os.path.join(tempfile.mkdtemp(prefix="rlhf-operator-tests-"), "kubeconfig")
os.environ["KUBECONFIG"] = KUBECONFIG

from collections.abc import AsyncIterator  # noqa: E402
from pathlib import Path  # noqa: E402

import kmock  # noqa: E402
import pytest  # noqa: E402
from kube_sim import OperatorRunner, RLHFEmulator, SimulatedKubeRay, write_kubeconfig  # noqa: E402


@pytest.fixture()
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RLHFEmulator]:
    """The emulated API server; $KUBECONFIG points at it for kopf and the kubernetes client."""
    async with RLHFEmulator() as emulator, kmock.Server(emulator) as server:
        write_kubeconfig(str(server.url).rstrip("/"), Path(KUBECONFIG))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator
        emulator.release_all()


@pytest.fixture()
async def kuberay(api: RLHFEmulator) -> AsyncIterator[SimulatedKubeRay]:
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
