"""The generated CRD: committed copy current, structural, same defaults and rules as pydantic."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kube_sim import sample_job
from rlhf_operator import crd
from rlhf_operator.api import RULES, RLHFJobSpec
from rlhf_operator.api.common import EnvFromSource, EnvVar, EnvVarSource

SPEC_SCHEMA = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]


def test_the_committed_crd_is_current() -> None:
    assert crd.CRD_FILE.read_text() == crd.render_crd(), "crds/ is out of date: run `make crds`"
    assert yaml.safe_load(crd.CRD_FILE.read_text()) == crd.build_crd()


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    if isinstance(node, dict):
        out.append((path, node))
        for key, child in (node.get("properties") or {}).items():
            out += _nodes(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                out += _nodes(node[key], f"{path}[{key}]")
    return out


@pytest.mark.parametrize("part", ["spec", "status"])
def test_the_schema_is_structural(part: str) -> None:
    for path, node in _nodes(SPEC_SCHEMA[part], part):
        for banned in ("anyOf", "oneOf", "allOf", "not", "$ref", "$defs", "definitions"):
            assert banned not in node, f"{path}: {banned} is not structural"
        typed = "type" in node or node.get("x-kubernetes-int-or-string")
        assert typed or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if "properties" in node:
            assert node["type"] == "object", path


def apply_defaults(value: Any, schema: dict) -> Any:
    """The API server's structural defaulting: missing fields get `default`, recursively."""
    if isinstance(value, dict) and "properties" in schema:
        value = dict(value)
        for key, prop in schema["properties"].items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = apply_defaults(value[key], prop)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(item, schema["items"]) for item in value]
    return value


MINIMAL = {
    "model": {"base": "gpt2"},
    "storage": {"uri": "s3://b/p"},
    "stages": {
        "sft": {"dataset": {"uri": "d"}},
        "reward": {"dataset": {"uri": "p"}},
        "ppo": {"prompts": {"uri": "q"}},
    },
}


@pytest.mark.parametrize("spec", [MINIMAL, sample_job()["spec"]], ids=["minimal", "sample"])
def test_crd_defaults_are_pydantics_defaults(spec: dict) -> None:
    by_api_server = apply_defaults(spec, SPEC_SCHEMA["spec"])
    by_pydantic = RLHFJobSpec.model_validate(spec).to_wire()
    assert by_api_server == by_pydantic


# --------------------------------------------------------------------------- CEL == Python

celpy = pytest.importorskip("celpy", reason="cel-python (dev extra) evaluates the CRD's CEL rules")

CASES = {
    "valid": {},
    "all-disabled": {
        "stages": {s: {"enabled": False} for s in ("sft", "reward", "ppo", "dpo", "evaluation")}
    },
    "sft-no-dataset": {"stages": {"sft": {"dataset": None}}},
    "sft-off-no-dataset": {"stages": {"sft": {"enabled": False, "dataset": None}}},
    "reward-no-dataset": {"stages": {"reward": {"dataset": None}}},
    "reward-pretrained": {"stages": {"reward": {"dataset": None, "model": "rm"}}},
    "ppo-without-reward": {"stages": {"reward": {"enabled": False}}},
    "ppo-pretrained-rm": {"stages": {"reward": {"enabled": False, "model": "rm"}}},
    "rm-positive-label": {"stages": {"reward": {"model": "rm", "positiveLabel": "POSITIVE"}}},
    "positive-label-no-rm": {"stages": {"reward": {"positiveLabel": "POSITIVE"}}},
    "ppo-no-prompts": {"stages": {"ppo": {"prompts": None}}},
    "eval-without-ppo": {"stages": {"ppo": {"enabled": False}}},
    "offload-params-z2": {"parallelism": {"offload": "parameters"}},
    "offload-params-z3": {"parallelism": {"offload": "parameters", "zeroStage": 3}},
    "offload-optim-z0": {"parallelism": {"offload": "optimizer", "zeroStage": 0}},
    "fp16-cpu": {"parallelism": {"precision": "fp16"}},
    "fp16-gpu": {
        "parallelism": {"precision": "fp16"},
        "cluster": {"workers": {"gpusPerWorker": 1}},
    },
    "batch-not-multiple": {"stages": {"sft": {"batchSize": 7}}},
    "micro-batch-ok": {"stages": {"reward": {"batchSize": 16, "microBatchSize": 4}}},
    "micro-batch-bad": {"stages": {"reward": {"batchSize": 16, "microBatchSize": 3}}},
    "rollout-not-multiple": {"stages": {"ppo": {"rolloutBatchSize": 9}}},
    "judge-is-the-rm": {
        "stages": {"reward": {"model": "rm"}, "evaluation": {"judge": {"model": "rm"}}}
    },
    "judge-other-model": {
        "stages": {"reward": {"model": "rm"}, "evaluation": {"judge": {"model": "clf"}}}
    },
    "judge-lexicon": {"stages": {"evaluation": {"judge": {"lexicon": "words.json"}}}},
    "grpo-group": {"stages": {"ppo": {"algorithm": "grpo", "samplesPerPrompt": 4}}},
    "grpo-kl-in-reward": {
        "stages": {"ppo": {"algorithm": "grpo", "samplesPerPrompt": 4, "klIn": "reward"}}
    },
    "grpo-no-group": {"stages": {"ppo": {"algorithm": "grpo"}}},
    "rloo-group-of-one": {"stages": {"ppo": {"algorithm": "rloo", "samplesPerPrompt": 1}}},
    "rloo-kl-in-loss": {
        "stages": {"ppo": {"algorithm": "rloo", "samplesPerPrompt": 2, "klIn": "loss"}}
    },
    "grpo-discounted": {
        "stages": {"ppo": {"algorithm": "grpo", "samplesPerPrompt": 2, "gamma": 0.9}}
    },
    "reinforce-pp": {"stages": {"ppo": {"algorithm": "reinforce_pp", "gamma": 0.99}}},
    "reinforce-pp-value-clip": {
        "stages": {"ppo": {"algorithm": "reinforce_pp", "valueClipRange": 0.2}}
    },
    "rloo-lam": {"stages": {"ppo": {"algorithm": "rloo", "samplesPerPrompt": 2, "lam": 0.9}}},
    "ppo-critic-settings": {"stages": {"ppo": {"valueLossCoef": 0.5, "lam": 0.9}}},
    "dpo-path": {
        "stages": {
            "reward": {"enabled": False, "model": "rm"},
            "ppo": {"enabled": False},
            "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            "evaluation": {"prompts": {"uri": "eval"}},
        }
    },
    "dpo-with-ppo": {"stages": {"dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8}}},
    "dpo-disabled-with-ppo": {"stages": {"dpo": {"enabled": False}}},
    "dpo-training-reward": {
        "stages": {
            "ppo": {"enabled": False},
            "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            "evaluation": {"enabled": False},
        }
    },
    "dpo-no-dataset": {
        "stages": {
            "reward": {"enabled": False},
            "ppo": {"enabled": False},
            "dpo": {"batchSize": 8},
            "evaluation": {"enabled": False},
        }
    },
    "dpo-eval-without-judge": {
        "stages": {
            "reward": {"enabled": False},
            "ppo": {"enabled": False},
            "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            "evaluation": {"prompts": {"uri": "eval"}},
        }
    },
    "dpo-eval-without-prompts": {
        "stages": {
            "reward": {"enabled": False, "model": "rm"},
            "ppo": {"enabled": False},
            "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
        }
    },
    "dpo-batch-not-multiple": {
        "stages": {
            "reward": {"enabled": False},
            "ppo": {"enabled": False},
            "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 7},
            "evaluation": {"enabled": False},
        }
    },
    # one rank per GPU: 2 pods x 4 GPUs = 8 ranks
    "rollout-per-gpu-ok": {
        "stages": {"ppo": {"rolloutBatchSize": 16}},
        "cluster": {"workers": {"gpusPerWorker": 4}},
    },
    "rollout-per-gpu-bad": {
        "stages": {"ppo": {"rolloutBatchSize": 12}},
        "cluster": {"workers": {"gpusPerWorker": 4}},
    },
    "batch-per-gpu-bad": {
        "stages": {"sft": {"batchSize": 20}},
        "cluster": {"workers": {"gpusPerWorker": 4}},
    },
}


VALID_CASES = {
    "valid",
    "sft-off-no-dataset",
    "reward-pretrained",
    "ppo-pretrained-rm",
    "rm-positive-label",
    "offload-params-z3",
    "fp16-gpu",
    "micro-batch-ok",
    "judge-other-model",
    "judge-lexicon",
    "grpo-group",
    "grpo-kl-in-reward",
    "reinforce-pp",
    "ppo-critic-settings",
    "dpo-path",
    "dpo-disabled-with-ppo",
    "rollout-per-gpu-ok",
}


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _python_broken(spec: dict) -> set[str]:
    try:
        RLHFJobSpec.model_validate(spec)
    except ValidationError as error:
        text = str(error)
        return {rule.message for rule in RULES if rule.message in text}
    return set()


def _cel_broken(spec: dict) -> set[str]:
    env = celpy.Environment()
    wire = apply_defaults(spec, SPEC_SCHEMA["spec"])  # CEL runs after defaulting
    activation = {"self": celpy.json_to_cel(wire)}
    return {
        rule.message
        for rule in RULES
        if not bool(env.program(env.compile(rule.cel)).evaluate(activation))
    }


@pytest.mark.parametrize("case", list(CASES))
def test_cel_rules_and_python_rules_agree(case: str) -> None:
    spec = _merge(sample_job()["spec"], CASES[case])
    python, cel = _python_broken(spec), _cel_broken(spec)
    assert python == cel
    assert (case in VALID_CASES) == (not python)


def test_the_readme_api_table_is_current() -> None:
    from rlhf_operator import apidoc

    readme = apidoc.README.read_text()
    assert apidoc.BEGIN in readme, "README lost its apidoc markers"
    assert apidoc.render(readme) == readme, "run `python -m rlhf_operator.apidoc`"
    assert "`spec.stages.ppo.klCoef`" in readme


# The pass-through models carry CEL rules of their own (one of value/valueFrom, reserved names):
# the API server and pydantic must accept and refuse the same items.
ITEM_CASES = [
    (EnvVar, {"name": "A", "value": "x"}),
    (EnvVar, {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
    (EnvVar, {"name": "A"}),
    (EnvVar, {"name": "A", "value": "x", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}),
    (EnvVar, {"name": "RAY_AUTH_MODE", "value": "disabled"}),
    (EnvVar, {"name": "RLHF_JOB_NAME", "value": "other-job"}),
    (EnvVarSource, {"secretKeyRef": {"name": "s", "key": "k"}}),
    (EnvVarSource, {}),
    (
        EnvVarSource,
        {"secretKeyRef": {"name": "s", "key": "k"}, "configMapKeyRef": {"name": "c", "key": "k"}},
    ),
    (EnvFromSource, {"secretRef": {"name": "s"}}),
    (EnvFromSource, {"configMapRef": {"name": "c"}, "prefix": "P_"}),
    (EnvFromSource, {}),
]


@pytest.mark.parametrize(("model", "item"), ITEM_CASES)
def test_pass_through_cel_rules_and_python_agree(model: type, item: dict) -> None:
    rules = model.model_config["json_schema_extra"]["x-kubernetes-validations"]
    env = celpy.Environment()
    activation = {"self": celpy.json_to_cel(item)}
    cel_ok = all(bool(env.program(env.compile(r["rule"])).evaluate(activation)) for r in rules)
    try:
        model.model_validate(item)
        python_ok = True
    except ValidationError:
        python_ok = False
    assert cel_ok == python_ok


JUDGES = {
    "model": ({"model": "clf", "positiveLabel": "POSITIVE"}, True),
    "lexicon": ({"lexicon": "words.json"}, True),
    "neither": ({}, False),
    "both": ({"model": "clf", "lexicon": "words.json"}, False),
    "label-without-model": ({"lexicon": "words.json", "positiveLabel": "POSITIVE"}, False),
}


@pytest.mark.parametrize("case", list(JUDGES))
def test_the_judges_cel_rules_and_python_rules_agree(case: str) -> None:
    from rlhf_operator.api.spec import JUDGE_RULES, JudgeSpec

    judge, valid = JUDGES[case]
    env = celpy.Environment()
    activation = {"self": celpy.json_to_cel(judge)}
    cel = {m for c, _, m in JUDGE_RULES if not env.program(env.compile(c)).evaluate(activation)}
    try:
        JudgeSpec.model_validate(judge)
        python: set[str] = set()
    except ValidationError as error:
        python = {m for _, _, m in JUDGE_RULES if m in str(error)}
    assert python == cel
    assert valid == (not python)
