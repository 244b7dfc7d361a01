"""The tiny example as test material: its data and model (made by examples/make_tiny.py) and
manifests with test-sized step counts. Imported by conftest.py and the trainer tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_MANIFEST = REPO / "examples" / "tiny-local.yaml"

# Smaller than the demo's (examples/tiny-local.yaml), still enough to show every stage learned.
TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    "sft": {"epochs": 1, "maxSteps": 40, "checkpointEverySteps": 15},
    "reward": {"epochs": 2, "maxSteps": 80, "checkpointEverySteps": 40},
    "ppo": {"steps": 30, "rolloutBatchSize": 64, "checkpointEverySteps": 10},
    "evaluation": {"numPrompts": 32, "samplesPerPrompt": 2},
}


def load_make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", REPO / "examples" / "make_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_manifest(tiny_dir: Path, storage: Path, **stage_overrides: dict[str, Any]) -> dict:
    """The tiny example's manifest pointed at `tiny_dir` and `storage`, with test step counts
    (and `stage_overrides`, merged into each stage's spec)."""
    manifest = yaml.safe_load(TINY_MANIFEST.read_text())
    spec = manifest["spec"]
    spec["model"]["base"] = str(tiny_dir / "model")
    spec["storage"]["uri"] = str(storage)
    stages = spec["stages"]
    stages["sft"]["dataset"]["uri"] = str(tiny_dir / "sft.jsonl")
    stages["reward"]["dataset"]["uri"] = str(tiny_dir / "preferences.jsonl")
    stages["ppo"]["prompts"]["uri"] = str(tiny_dir / "prompts.jsonl")
    stages["evaluation"]["prompts"]["uri"] = str(tiny_dir / "eval_prompts.jsonl")
    stages["evaluation"]["judge"]["lexicon"] = str(tiny_dir / "judge_lexicon.json")
    for stage, overrides in TEST_OVERRIDES.items():
        stages[stage].update(overrides)
    for stage, overrides in stage_overrides.items():
        stages[stage].update(overrides)
    return manifest


def write_manifest(path: Path, manifest: dict) -> Path:
    path.write_text(yaml.safe_dump(manifest))
    return path
