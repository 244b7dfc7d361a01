"""Session-wide test environment, set before any test module imports the operator or the client.

Under a plain `pytest` run, tests/chart imports `kubernetes` and `rlhf_operator.handlers` before
tests/operator/conftest.py is loaded, and both freeze values at import: the client takes
$KUBECONFIG's value as its default path (which kopf's default login reads), and the operator
takes its resync interval from RLHF_RESYNC_INTERVAL. So they are set here, at the root.
Operator tests rewrite the one kubeconfig file per test to point at their emulated API server.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RLHF_RESYNC_INTERVAL", "60")  # long: tests prove the event path
os.environ.setdefault("RLHF_EXPLAIN_INTERVAL", "0.5")  # a waiting job says why within a second
os.environ.setdefault("RLHF_POOL_SWEEP_INTERVAL", "0.2")  # warm-pool expiry sweep
os.environ["KUBECONFIG"] = os.path.join(tempfile.mkdtemp(prefix="rlhf-tests-"), "kubeconfig")


# ------------------------------------------------------------------ one local Ray per session

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PVC_ROOT = Path(tempfile.mkdtemp(prefix="rlhf-pvc-"))
"""Stands in for the Ray pods' claim mounts (/mnt/rlhf/<claim>): `pvc://claim/x` is
PVC_ROOT/claim/x for every process of the session's Ray (RLHF_PVC_MOUNT_ROOT)."""


@pytest.fixture(scope="session")
def ray_session() -> Iterator[str]:
    """One local Ray for the whole session, shared by the trainer tests (the stages attach to
    it) and the real-Ray operator test (which submits RayJobs to its job API); yields the
    dashboard's address (http://127.0.0.1:8265).

    The environment of its processes is set here, explicitly, not inherited by luck:
    - `python` on PATH is this interpreter (a RayJob's entrypoint says `python -m rlhf_trainer`,
      as the trainer image's PATH does);
    - RAY_AUTH_MODE=disabled: no token is required by the GCS or the dashboard, whatever
      ~/.ray/auth_token or the caller's environment holds (a cluster with token auth would
      need the submitter to carry the token; this test KubeRay does not model that);
    - RLHF_PVC_MOUNT_ROOT: where pvc:// claims are "mounted" (PVC_ROOT);
    - KUBECONFIG (set above): the status sink's credentials when it is not in a pod.
    """
    import ray
    from rlhf_trainer.launcher import ensure_ray

    bin_dir = os.path.dirname(sys.executable)
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RLHF_PVC_MOUNT_ROOT"] = str(PVC_ROOT)
    ensure_ray(attach=False, dashboard=True)
    yield ray._private.worker.get_dashboard_url() or "127.0.0.1:8265"
    ray.shutdown()
    shutil.rmtree(PVC_ROOT, ignore_errors=True)
