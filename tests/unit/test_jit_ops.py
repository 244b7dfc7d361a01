"""`rlhf run` says when DeepSpeed will compile its CPU op first (rlhf_trainer.jit_ops), from what
is on disk, and a local Ray gets one torch extension cache per Python environment.

The cache layouts below are the ones torch.utils.cpp_extension writes (build.ninja naming the
absolute source paths, `<op>.so` beside it); tests/trainer/test_local_run.py checks the real
build of a run reads as built."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rlhf_trainer import jit_ops
from rlhf_trainer.jit_ops import EXTENSIONS_ENV, SHM_OP


def fake_deepspeed(root: Path) -> Path:
    """A deepspeed package directory with the shm op's sources."""
    sources = root / "deepspeed" / jit_ops.SHM_SOURCES
    sources.mkdir(parents=True)
    for name in ("shm_interface.cpp", "shm.cpp"):
        (sources / name).write_text("// source\n")
    return root / "deepspeed"


def build(extensions_dir: Path, deepspeed: Path, so_age_s: float = 0.0) -> Path:
    """What torch leaves after building the op from `deepspeed`'s sources."""
    directory = extensions_dir / SHM_OP
    directory.mkdir(parents=True)
    sources = deepspeed / jit_ops.SHM_SOURCES
    (directory / "build.ninja").write_text(
        f"build shm_interface.o: compile {sources / 'shm_interface.cpp'}\n"
        f"build shm.o: compile {sources / 'shm.cpp'}\n"
        f"build {SHM_OP}.so: link shm_interface.o shm.o\n"
    )
    library = directory / f"{SHM_OP}.so"
    library.write_bytes(b"\x7fELF")
    newest = max(p.stat().st_mtime for p in sources.glob("*.cpp"))
    os.utime(library, (newest - so_age_s, newest - so_age_s) if so_age_s else None)
    return directory


def test_an_empty_cache_gets_the_notice_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jit_ops, "deepspeed_dir", lambda: fake_deepspeed(tmp_path))
    cache = tmp_path / "ext"
    cache.mkdir()
    notice = jit_ops.compile_notice(0, {EXTENSIONS_ENV: str(cache)})
    assert notice is not None
    assert notice.startswith("deepspeed: compiling its CPU communication op once")
    assert str(cache) in notice


def test_a_build_of_this_install_is_reused(tmp_path: Path) -> None:
    deepspeed = fake_deepspeed(tmp_path)
    build(tmp_path / "ext", deepspeed)
    assert not jit_ops.shm_op_pending(tmp_path / "ext", deepspeed)


def test_a_build_from_another_environment_is_rebuilt(tmp_path: Path) -> None:
    mine = fake_deepspeed(tmp_path / "venv-a")
    theirs = fake_deepspeed(tmp_path / "venv-b")
    build(tmp_path / "ext", theirs)
    assert jit_ops.shm_op_pending(tmp_path / "ext", mine)


def test_a_build_older_than_its_sources_is_rebuilt(tmp_path: Path) -> None:
    deepspeed = fake_deepspeed(tmp_path)
    build(tmp_path / "ext", deepspeed, so_age_s=60)
    assert jit_ops.shm_op_pending(tmp_path / "ext", deepspeed)


def test_a_recipe_without_the_library_is_rebuilt(tmp_path: Path) -> None:
    deepspeed = fake_deepspeed(tmp_path)
    directory = build(tmp_path / "ext", deepspeed)
    (directory / f"{SHM_OP}.so").unlink()  # a build cut short
    assert jit_ops.shm_op_pending(tmp_path / "ext", deepspeed)


def test_a_prebuilt_op_needs_no_build(tmp_path: Path) -> None:
    deepspeed = fake_deepspeed(tmp_path)
    prebuilt = deepspeed / jit_ops.PREBUILT_DIR
    prebuilt.mkdir(parents=True)
    (prebuilt / f"{SHM_OP}_op.cpython-311-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    assert not jit_ops.shm_op_pending(tmp_path / "empty", deepspeed)


def test_gpu_workers_get_no_notice(tmp_path: Path) -> None:
    assert jit_ops.compile_notice(1, {EXTENSIONS_ENV: str(tmp_path)}) is None


def test_each_environment_gets_its_own_cache() -> None:
    a, b = (jit_ops.environment_extensions_dir(p) for p in ("/venvs/a/.venv", "/venvs/b/.venv"))
    assert a != b
    assert a == jit_ops.environment_extensions_dir("/venvs/a/.venv")  # stable across runs
    assert a.name.startswith("py3") and ".venv" in a.name


def test_a_cache_the_user_set_is_kept(tmp_path: Path) -> None:
    env = {EXTENSIONS_ENV: str(tmp_path)}
    assert jit_ops.use_environment_extensions_dir(env) == tmp_path
    assert env[EXTENSIONS_ENV] == str(tmp_path)


@pytest.mark.parametrize("unset", [{}, {EXTENSIONS_ENV: ""}])
def test_an_unset_cache_becomes_this_environments(unset: dict[str, str]) -> None:
    env = dict(unset)
    chosen = jit_ops.use_environment_extensions_dir(env)
    assert env[EXTENSIONS_ENV] == str(chosen) == str(jit_ops.environment_extensions_dir())
