"""The tiny example as test material: its data and model (made by examples/make_tiny.py) and
manifests with test-sized step counts. Imported by conftest.py, the trainer tests and bench/."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_MANIFEST = REPO / "examples" / "tiny-local.yaml"

# Smaller than the demo's (examples/tiny-local.yaml), still enough to show every stage learned.
# SFT and the reward model train as in the demo (3 epochs, ~170 steps, ~15 s of compute each):
# PPO's KL anchors to the SFT policy's habits, and from a 40-step SFT that ends reviews anywhere
# the policy learned short all-positive answers the reward model scores as high as long ones
# (judge win rate 0.81 against 0.94 from the demo's SFT, same PPO).
TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    "sft": {"checkpointEverySteps": 50},
    "reward": {"checkpointEverySteps": 50},
    "ppo": {"steps": 30, "rolloutBatchSize": 64, "checkpointEverySteps": 10},
    "evaluation": {"numPrompts": 32, "samplesPerPrompt": 2},
}


def load_make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", REPO / "examples" / "make_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_manifest(tiny_dir: Path, storage: Path) -> dict:
    """The tiny example's manifest (the demo's settings) pointed at `tiny_dir` and `storage`."""
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
    return manifest


def tiny_manifest(tiny_dir: Path, storage: Path, **stage_overrides: dict[str, Any]) -> dict:
    """The demo's manifest with test step counts (and `stage_overrides`, merged into each
    stage's spec)."""
    manifest = demo_manifest(tiny_dir, storage)
    stages = manifest["spec"]["stages"]
    for stage, overrides in TEST_OVERRIDES.items():
        stages[stage].update(overrides)
    for stage, overrides in stage_overrides.items():
        stages[stage].update(overrides)
    return manifest


def write_manifest(path: Path, manifest: dict) -> Path:
    path.write_text(yaml.safe_dump(manifest))
    return path
