"""The two Dockerfiles, checked for structure (no Docker engine here: `make images` builds them
where one exists). What can be checked without building: non-root users that agree with the
pods that run them, pinned versions that satisfy pyproject.toml, and build contexts that contain
every file the Dockerfiles copy."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from chart_helpers import CHART, REPO
from packaging.requirements import Requirement
from rlhf_operator.builders import RAY_GID, RAY_UID, RAY_VERSION

OPERATOR = REPO / "operator" / "Dockerfile"
TRAINER = REPO / "trainer_image" / "Dockerfile"
PINNED = {"torch": "TORCH_VERSION", "ray": "RAY_VERSION", "deepspeed": "DEEPSPEED_VERSION",
          "transformers": "TRANSFORMERS_VERSION"}  # fmt: skip


@dataclass
class Stage:
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    args: dict[str, str]  # global and stage ARG defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse(path: Path) -> Dockerfile:
    """Instructions with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), " ".join(rest.split())
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value.strip('"')
        if keyword == "FROM":
            base = rest.split(" AS ")[0].split(" as ")[0]
            stages.append(Stage(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(args, stages)


def ignored(dockerignore: Path, relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes."""
    result = False
    for raw in dockerignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = relative.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            result = not negate
    return result


def final_user(dockerfile: Dockerfile) -> tuple[int, int | None]:
    users = dockerfile.final.all("USER")
    assert users, "the final stage sets no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), f"USER {users[-1]}: numeric, so runAsNonRoot can verify it"
    return int(user), int(group) if group else None


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_runs_as_a_numeric_non_root_user(path: Path) -> None:
    uid, _ = final_user(parse(path))
    assert uid != 0


@pytest.mark.parametrize("path", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_build_context_holds_every_copied_file(path: Path) -> None:
    """COPY sources exist and are not excluded by the Dockerfile's own .dockerignore (the
    context is the repository root: `docker build -f <Dockerfile> .`)."""
    copies = [c for c in _all_copies(path) if "--from=" not in c]
    assert copies
    # BuildKit reads <Dockerfile>.dockerignore; other builders only the context's .dockerignore.
    for dockerignore in (path.with_name("Dockerfile.dockerignore"), REPO / ".dockerignore"):
        where = dockerignore.relative_to(REPO)
        assert dockerignore.is_file(), f"{where} is missing"
        for copy in copies:
            for source in [w for w in copy.split() if not w.startswith("--")][:-1]:
                source = source.rstrip("/")
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such path"
                assert not ignored(dockerignore, source), f"{where} excludes {source}"
        # ...and the context stays small: no virtualenv, no git history, no model weights.
        for heavy in (".venv/bin/python", ".git/HEAD", "examples/tiny/model", "out/x", ".tools/b"):
            assert ignored(dockerignore, heavy), f"{where} sends {heavy} to the builder"


def _all_copies(path: Path) -> list[str]:
    return [a for stage in parse(path).stages for a in stage.all("COPY")]


def test_operator_image_is_slim_and_matches_the_chart() -> None:
    dockerfile = parse(OPERATOR)
    runs = " ".join(a for stage in dockerfile.stages for a in stage.all("RUN"))
    assert re.search(r"pip install \.(\s|$)", runs), "the operator installs `.` without extras"
    assert not re.search(r"torch|\bray\b|deepspeed|transformers|\[trainer\]", runs)
    assert "slim" in dockerfile.final.base
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid, gid = final_user(dockerfile)
    assert values["podSecurityContext"]["runAsUser"] == uid
    assert values["podSecurityContext"]["runAsGroup"] == gid
    entrypoint = dockerfile.final.all("ENTRYPOINT")[-1]
    assert entrypoint == '["rlhf-operator"]'


def test_trainer_image_is_cuda_pinned_and_matches_the_ray_pods() -> None:
    dockerfile = parse(TRAINER)
    assert dockerfile.final.base.startswith("nvidia/cuda:")
    assert re.search(r":\d+\.\d+\.\d+-cudnn-", dockerfile.final.base), "pin the CUDA version"
    # The Ray pods run as the uid/gid the operator's builders put in their securityContext.
    assert final_user(dockerfile) == (RAY_UID, RAY_GID)
    # ... and the Ray the RayCluster declares (spec.rayVersion: KubeRay's token auth needs it).
    assert dockerfile.args["RAY_VERSION"] == RAY_VERSION


def test_trainer_pins_satisfy_pyproject() -> None:
    """Exact pins, inside the ranges pyproject.toml's `trainer` extra declares."""
    args = parse(TRAINER).args
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = {Requirement(r).name: Requirement(r) for r in
                pyproject["project"]["optional-dependencies"]["trainer"]}  # fmt: skip
    runs = " ".join(a for stage in parse(TRAINER).stages for a in stage.all("RUN"))
    for package, arg in PINNED.items():
        version = args[arg]
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{arg}={version} is not an exact pin"
        assert declared[package].specifier.contains(version), (
            f"{package}=={version} is outside pyproject's {declared[package]}"
        )
        assert f"=={'${' + arg + '}'}" in runs, f"{arg} is declared but not used by pip"
    assert "/tmp/src[trainer]" in runs, "the trainer image installs the project's trainer extra"


def test_make_images_builds_both() -> None:
    makefile = (REPO / "Makefile").read_text()
    target = makefile.split("\nimages:", 1)[1].split("\n\n", 1)[0]
    assert "docker build -f operator/Dockerfile" in target
    assert "docker build -f trainer_image/Dockerfile" in target
