"""DeepSpeed's one JIT-compiled op on CPU workers: where torch caches it, and whether the next
worker group will have to compile it.

On CPU, DeepSpeed's communication backend builds its shared-memory all-reduce op
(`deepspeed_shm_comm`, DeepSpeed's ShareMemCommBuilder) when the first worker group starts,
with torch.utils.cpp_extension, into `$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/`. That takes
25-80 s on two cores (77 s measured at load average 9, 194 s at 49), once; the build is reused
as long as the sources it was built from (this environment's DeepSpeed, torch headers) are the
ones on disk. `rlhf run` checks this before the first stage so that a silent minute reads as
what it is.

torch's default cache (`~/.cache/torch_extensions/py311_cpu`) is shared by every Python
environment of the user: two checkouts with different virtual environments then rebuild the op
in turn, each invalidating the other's build (their source paths differ). A local Ray therefore
gets a cache directory of its own per environment (`environment_extensions_dir`), unless
TORCH_EXTENSIONS_DIR is set. Pods of a cluster are left alone (one image, one environment).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
SHM_OP = "deepspeed_shm_comm"
# ShareMemCommBuilder.sources() live here, under the deepspeed package.
SHM_SOURCES = Path("ops", "csrc", "cpu", "comm")
# Where an op lands when DeepSpeed was installed with it prebuilt (DS_BUILD_SHM_COMM=1).
PREBUILT_DIR = Path("ops", "comm")


def deepspeed_dir() -> Path | None:
    """The installed deepspeed package directory, found without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def environment_extensions_dir(prefix: str = sys.prefix) -> Path:
    """torch's extension cache, one directory per Python environment (virtualenv)."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = hashlib.sha256(os.path.realpath(prefix).encode()).hexdigest()[:10]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(get_default_build_root()) / f"{version}-{Path(prefix).name}-{tag}"


def use_environment_extensions_dir(env: MutableMapping[str, str] = os.environ) -> Path:
    """Set TORCH_EXTENSIONS_DIR to this environment's cache unless it is set; the directory
    (for a local Ray's workers: set before Ray starts, they inherit it)."""
    if not env.get(EXTENSIONS_ENV):
        env[EXTENSIONS_ENV] = str(environment_extensions_dir())
    return Path(env[EXTENSIONS_ENV])


def shm_op_pending(extensions_dir: Path, deepspeed: Path | None = None) -> bool:
    """True when starting a CPU worker group will compile DeepSpeed's shm op first.

    Built = prebuilt into the deepspeed install, or a `deepspeed_shm_comm*.so` in the cache whose
    build.ninja compiled this install's sources, newer than those sources (what ninja checks).
    """
    deepspeed = deepspeed or deepspeed_dir()
    if deepspeed is None:
        return False  # no DeepSpeed here: the stage will say so itself
    if any((deepspeed / PREBUILT_DIR).glob(f"{SHM_OP}_op*.so")):
        return False
    build = extensions_dir / SHM_OP
    sources = deepspeed / SHM_SOURCES
    try:
        recipe = (build / "build.ninja").read_text(encoding="utf-8")
    except OSError:
        return True
    if f"{sources}{os.sep}" not in recipe:
        return True  # built from another environment's DeepSpeed: ninja rebuilds it
    built = [p.stat().st_mtime for p in build.glob(f"{SHM_OP}*.so")]
    newest_source = max((p.stat().st_mtime for p in sources.glob("*.cpp")), default=0.0)
    return not built or max(built) < newest_source


def compile_notice(gpus_per_worker: int, env: Mapping[str, str] = os.environ) -> str | None:
    """The line `rlhf run` prints before the first stage when the op will compile, else None."""
    if gpus_per_worker > 0:
        return None  # GPU workers use NCCL: no shm op
    extensions_dir = Path(env.get(EXTENSIONS_ENV) or environment_extensions_dir())
    if not shm_op_pending(extensions_dir):
        return None
    return (
        "deepspeed: compiling its CPU communication op once for this Python environment "
        f"(25-80 s on 2 cores, more on a busy machine; cached in {extensions_dir})"
    )
