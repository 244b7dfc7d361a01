"""Helpers for the Helm chart tests: paths, running helm, picking manifests (conftest.py has
the fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rlhf-operator"
TOOLS_BIN = REPO / ".tools" / "bin"
RELEASE = "rel"
RELEASE_NAMESPACE = "rlhf-system"

Render = Callable[..., list[dict[str, Any]]]


def find_helm() -> str | None:
    """helm from PATH, else .tools/bin, else installed there by scripts/install_tools.py."""
    found = shutil.which("helm") or shutil.which("helm", path=str(TOOLS_BIN))
    if found:
        return found
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import install_tools

        install_tools.ensure_tools(TOOLS_BIN)
    except (SystemExit, Exception) as exc:  # no network, unsupported platform, ...
        print(f"could not install helm: {exc}", file=sys.stderr)
        return None
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return shutil.which("helm", path=str(TOOLS_BIN))


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with its caches in /tmp (no writes to the user's ~/.config or ~/.cache)."""
    env = {
        **os.environ,
        "HELM_CACHE_HOME": "/tmp/rlhf-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/rlhf-helm/config",
        "HELM_DATA_HOME": "/tmp/rlhf-helm/data",
    }
    return subprocess.run([helm, *args], capture_output=True, text=True, env=env, timeout=60)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
