"""Session-wide test environment, set before any test module imports the operator or the client.

Under a plain `pytest` run, tests/chart imports `kubernetes` and `rlhf_operator.handlers` before
tests/operator/conftest.py is loaded, and both freeze values at import: the client takes
$KUBECONFIG's value as its default path (which kopf's default login reads), and the operator's
timer takes its interval from RLHF_RECONCILE_INTERVAL. So they are set here, at the root.
Operator tests rewrite the one kubeconfig file per test to point at their emulated API server.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("RLHF_RECONCILE_INTERVAL", "0.1")  # scenarios finish in seconds
os.environ.setdefault("RLHF_POOL_SWEEP_INTERVAL", "0.2")  # warm-pool expiry sweep
os.environ["KUBECONFIG"] = os.path.join(tempfile.mkdtemp(prefix="rlhf-tests-"), "kubeconfig")
