"""Bad RLHFJob manifests: each is refused with a message that names the field and the fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kube_sim import sample_job
from rlhf_operator import names
from rlhf_operator.validation import validate


def problems(name: str = "demo", **spec: Any) -> list[str]:
    job, found = validate(sample_job(name, **spec))
    assert (job is None) == bool(found)
    return found


def test_a_good_manifest_is_valid_and_defaulted() -> None:
    job, found = validate(sample_job("demo"))
    assert found == [] and job is not None
    assert job.spec.run_policy.backoff_limit == 1
    assert job.spec.parallelism.zero_stage == 2  # defaults filled as the API server would


def test_status_in_the_manifest_is_not_the_specs_business() -> None:
    manifest = sample_job("demo") | {"status": {"phase": "Running", "kopf": {"junk": 1}}}
    assert validate(manifest)[1] == []


SCHEMA_ERRORS = [
    ({"stages": {"ppo": {"clipRange": 3}}}, "spec.stages.ppo.clipRange"),
    ({"stages": {"sft": {"epochs": 0}}}, "spec.stages.sft.epochs"),
    ({"stages": {"sft": {"learningRate": -1}}}, "spec.stages.sft.learningRate"),
    ({"cluster": {"workers": {"replicas": 0}}}, "spec.cluster.workers.replicas"),
    ({"cluster": {"workers": {"gpusPerWorker": 99}}}, "spec.cluster.workers.gpusPerWorker"),
    ({"cluster": {"imagePullPolicy": "Sometimes"}}, "spec.cluster.imagePullPolicy"),
    ({"parallelism": {"zeroStage": 4}}, "spec.parallelism.zeroStage"),
    ({"parallelism": {"precision": "int8"}}, "spec.parallelism.precision"),
    ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ({"runPolicy": {"activeDeadlineSeconds": 0}}, "spec.runPolicy.activeDeadlineSeconds"),
    ({"runPolicy": {"keepAttempts": 0}}, "spec.runPolicy.keepAttempts"),
    ({"cluster": {"provisionTimeoutSeconds": 5}}, "spec.cluster.provisionTimeoutSeconds"),
    ({"warmPool": {"keepAliveSeconds": 100000}}, "spec.warmPool.keepAliveSeconds"),
    ({"warmPool": {"pool": "Not_A_Name"}}, "spec.warmPool.pool"),
    ({"storage": {"secretRef": {"name": "UPPER"}}}, "spec.storage.secretRef.name"),
    ({"stages": {"sft": {"epocs": 2}}}, "spec.stages.sft.epocs: unknown field"),
    ({"model": {"base": ""}}, "spec.model.base"),
    ({"cluster": {"env": [{"name": "1BAD", "value": "x"}]}}, "spec.cluster.env[0].name"),
    ({"cluster": {"env": [{"name": "HF_TOKEN"}]}}, "spec.cluster.env[0]: HF_TOKEN: set exactly"),
    (
        {"cluster": {"env": [{"name": "A", "value": "x", "valueFrom": {}}]}},
        "spec.cluster.env[0]",
    ),
    (
        {"cluster": {"env": [{"name": "RAY_AUTH_TOKEN", "value": "x"}]}},
        "spec.cluster.env[0]: RAY_AUTH_TOKEN: names starting with RAY_AUTH_ or RLHF_",
    ),
    (
        {"cluster": {"env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}},
        "spec.cluster.env[0].valueFrom.secretKeyRef.key",
    ),
    (
        {"cluster": {"env": [{"name": "A", "valueFrom": {"fieldRef": {}}}]}},
        "spec.cluster.env[0].valueFrom.fieldRef: unknown field",
    ),
    ({"cluster": {"envFrom": [{}]}}, "spec.cluster.envFrom[0]: envFrom: set exactly one"),
    ({"cluster": {"envFrom": [{"secretRef": {"name": "Bad_Name"}}]}}, "spec.cluster.envFrom[0]"),
    ({"cluster": {"imagePullSecrets": [{"name": ""}]}}, "spec.cluster.imagePullSecrets[0].name"),
    (
        {"cluster": {"head": {"tolerations": [{"operator": "Sometimes"}]}}},
        "spec.cluster.head.tolerations[0].operator",
    ),
    ({"cluster": {"head": {"nodeSelector": {"a": 1}}}}, "spec.cluster.head.nodeSelector.a"),
    ({"stages": {"ppo": {"algorithm": "a2c"}}}, "spec.stages.ppo.algorithm"),
    ({"stages": {"ppo": {"samplesPerPrompt": 0}}}, "spec.stages.ppo.samplesPerPrompt"),
    ({"stages": {"ppo": {"klIn": "both"}}}, "spec.stages.ppo.klIn"),
    ({"stages": {"dpo": {"lossType": "hinge"}}}, "spec.stages.dpo.lossType"),
    ({"stages": {"dpo": {"beta": 0}}}, "spec.stages.dpo.beta"),
    ({"stages": {"ppo": {"rolloutMicroBatchSize": 0}}}, "spec.stages.ppo.rolloutMicroBatchSize"),
    ({"parallelism": {"lora": {"rank": 0}}}, "spec.parallelism.lora.rank"),
    ({"parallelism": {"lora": {"alpha": -1}}}, "spec.parallelism.lora.alpha"),
    ({"parallelism": {"lora": {"targetModules": "c_attn"}}}, "spec.parallelism.lora.targetModules"),
    ({"stages": {"ppo": {"rollout": {"engine": "sglang"}}}}, "spec.stages.ppo.rollout.engine"),
    (
        {"stages": {"evaluation": {"rollout": {"engine": "trt"}}}},
        "spec.stages.evaluation.rollout.engine",
    ),
    (
        {"stages": {"ppo": {"rollout": {"vllm": {"gpuMemoryUtilization": 1.5}}}}},
        "spec.stages.ppo.rollout.vllm.gpuMemoryUtilization",
    ),
    (
        {"stages": {"ppo": {"rollout": {"vllm": {"maxNumSeqs": 0}}}}},
        "spec.stages.ppo.rollout.vllm.maxNumSeqs",
    ),
    (
        {"stages": {"ppo": {"rollout": {"vllm": {"enablePrefixCaching": "maybe"}}}}},
        "spec.stages.ppo.rollout.vllm.enablePrefixCaching",
    ),
    (
        {"stages": {"reward": {"model": "rm", "positiveLabel": ""}}},
        "spec.stages.reward.positiveLabel",
    ),
    ({"stages": {"ppo": {"missingEosPenalty": -1}}}, "spec.stages.ppo.missingEosPenalty"),
    (
        {"stages": {"ppo": {"prompts": {"uri": "p", "truncationSide": "middle"}}}},
        "spec.stages.ppo.prompts.truncationSide",
    ),
    (
        {"stages": {"evaluation": {"judge": {"model": "m", "positiveLabel": ""}}}},
        "spec.stages.evaluation.judge.positiveLabel",
    ),
    (
        {"stages": {"evaluation": {"judge": {"model": "m", "lexicn": "x"}}}},
        "spec.stages.evaluation.judge.lexicn: unknown field",
    ),
]


@pytest.mark.parametrize(("spec", "field"), SCHEMA_ERRORS, ids=[f for _, f in SCHEMA_ERRORS])
def test_schema_errors_name_the_field(spec: dict, field: str) -> None:
    assert any(field in p for p in problems(**spec)), problems(**spec)


UNKNOWN_FIELDS = [
    ({"stage": {}}, "spec.stage: unknown field; did you mean spec.stages?"),
    ({"stages": {"sft": {"epocs": 2}}}, "did you mean spec.stages.sft.epochs?"),
    ({"cluster": {"workers": {"replica": 2}}}, "did you mean spec.cluster.workers.replicas?"),
    ({"parallelism": {"zerostage": 2}}, "did you mean spec.parallelism.zeroStage?"),
    (
        {"cluster": {"workers": {"tolerations": [{"efect": "NoSchedule"}]}}},
        "spec.cluster.workers.tolerations[0].efect: unknown field; did you mean "
        "spec.cluster.workers.tolerations[0].effect?",
    ),
    ({"zzz": 1}, "spec.zzz: unknown field; remove it or check its spelling."),
]


@pytest.mark.parametrize(("spec", "text"), UNKNOWN_FIELDS, ids=[t for _, t in UNKNOWN_FIELDS])
def test_unknown_fields_suggest_the_nearest_valid_name(spec: dict, text: str) -> None:
    """The operator's Valid=False message and `rlhf validate` share this text."""
    assert any(text in p for p in problems(**spec)), problems(**spec)


RULE_ERRORS = [
    ({"stages": {"sft": {"dataset": None}}}, "spec.stages.sft.dataset is required"),
    ({"stages": {"reward": {"dataset": None}}}, "spec.stages.reward.dataset is required"),
    ({"stages": {"ppo": {"prompts": None}}}, "spec.stages.ppo.prompts is required"),
    (
        {"stages": {"reward": {"enabled": False}}},
        "spec.stages.ppo needs a reward model",
    ),
    (
        {"stages": {"ppo": {"enabled": False}}},
        "spec.stages.evaluation compares the PPO (or DPO) policy",
    ),
    (
        {"stages": {"ppo": {"algorithm": "grpo"}}},
        "spec.stages.ppo.samplesPerPrompt must be 2 or more for algorithm grpo or rloo",
    ),
    (
        {"stages": {"ppo": {"algorithm": "rloo", "samplesPerPrompt": 4, "klIn": "loss"}}},
        "spec.stages.ppo.klIn: loss is GRPO's KL term",
    ),
    (
        {"stages": {"ppo": {"algorithm": "rloo", "samplesPerPrompt": 4, "gamma": 0.9}}},
        "spec.stages.ppo.gamma: grpo and rloo score whole responses",
    ),
    *(
        (
            {"stages": {"ppo": {"algorithm": "grpo", "samplesPerPrompt": 4, field: 0.5}}},
            f"spec.stages.ppo.{field} configures the value model, which only algorithm ppo has",
        )
        for field in ("valueLearningRate", "valueClipRange", "valueLossCoef", "lam")
    ),
    (
        {"stages": {"dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8}}},
        "spec.stages.dpo replaces PPO: set spec.stages.ppo.enabled: false",
    ),
    (
        {"stages": {"ppo": {"enabled": False}, "dpo": {"dataset": {"uri": "p"}, "batchSize": 8}}},
        "spec.stages.dpo trains on preference pairs directly, without a reward model",
    ),
    (
        {"stages": {"reward": {"enabled": False}, "ppo": {"enabled": False}, "dpo": {}}},
        "spec.stages.dpo.dataset is required",
    ),
    (
        {
            "stages": {
                "reward": {"enabled": False},
                "ppo": {"enabled": False},
                "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            }
        },
        "spec.stages.evaluation scores with a reward model, and spec.stages.dpo trains none",
    ),
    (
        {
            "stages": {
                "reward": {"model": "rm"},
                "ppo": {"enabled": False},
                "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            }
        },
        "spec.stages.evaluation.prompts is required with spec.stages.dpo",
    ),
    ({"parallelism": {"offload": "parameters"}}, "requires spec.parallelism.zeroStage: 3"),
    ({"parallelism": {"precision": "fp16"}}, "spec.parallelism.precision: fp16 needs GPUs"),
    ({"stages": {"sft": {"batchSize": 7}}}, "spec.stages.sft.batchSize must be a multiple"),
    ({"stages": {"ppo": {"rolloutBatchSize": 9}}}, "spec.stages.ppo.rolloutBatchSize"),
    (
        # 2 pods x 4 GPUs = 8 ranks: 12 prompts cannot be shared equally.
        {
            "stages": {"ppo": {"rolloutBatchSize": 12}},
            "cluster": {"workers": {"replicas": 2, "gpusPerWorker": 4}},
        },
        "rolloutBatchSize must be a multiple of spec.cluster.workers.replicas x gpusPerWorker",
    ),
    (
        {"stages": {"ppo": {"rollout": {"engine": "vllm", "vllm": {"tensorParallelSize": 3}}}}},
        "spec.stages.ppo.rollout.vllm.tensorParallelSize must divide",
    ),
    (
        {"stages": {"evaluation": {"rollout": {"vllm": {"tensorParallelSize": 4}}}}},
        "spec.stages.evaluation.rollout.vllm.tensorParallelSize must divide",
    ),
    (
        # 1 pod x 2 GPUs = 2 ranks: one tensor-parallel pair is fine, 4 is not.
        {
            "stages": {"ppo": {"rollout": {"engine": "vllm", "vllm": {"tensorParallelSize": 4}}}},
            "cluster": {"workers": {"replicas": 1, "gpusPerWorker": 2}},
        },
        "spec.stages.ppo.rollout.vllm.tensorParallelSize must divide spec.cluster.workers."
        "replicas x gpusPerWorker",
    ),
    (
        {"parallelism": {"lora": {}}, "stages": {"ppo": {"rollout": {"engine": "vllm"}}}},
        "spec.stages.ppo.rollout.engine: vllm cannot sample from a LoRA policy",
    ),
    (
        {"stages": {"reward": {"positiveLabel": "POSITIVE"}}},
        "spec.stages.reward.positiveLabel picks a label of a pretrained classifier",
    ),
    (
        {"stages": {"evaluation": {"judge": {}}}},
        "spec.stages.evaluation.judge: set exactly one of model",
    ),
    (
        {"stages": {"evaluation": {"judge": {"model": "m", "lexicon": "l.json"}}}},
        "spec.stages.evaluation.judge: set exactly one of model",
    ),
    (
        {"stages": {"evaluation": {"judge": {"lexicon": "l.json", "positiveLabel": "POSITIVE"}}}},
        "spec.stages.evaluation.judge.positiveLabel picks a label of the judge model",
    ),
    (
        {
            "stages": {
                "reward": {"model": "lvwerra/distilbert-imdb"},
                "evaluation": {"judge": {"model": "lvwerra/distilbert-imdb"}},
            }
        },
        "spec.stages.evaluation.judge.model is the reward model PPO optimised",
    ),
]


@pytest.mark.parametrize(("spec", "text"), RULE_ERRORS, ids=[t for _, t in RULE_ERRORS])
def test_cross_field_rules(spec: dict, text: str) -> None:
    assert any(text in p for p in problems(**spec)), problems(**spec)


def test_lora_with_vllm_is_fine_when_only_evaluation_uses_vllm() -> None:
    # Evaluation samples the saved, merged policy: plain transformers weights vLLM can load.
    spec = {"parallelism": {"lora": {}}, "stages": {"evaluation": {"rollout": {"engine": "vllm"}}}}
    assert problems(**spec) == []


SEMANTIC_ERRORS = [
    ({"storage": {"uri": "/data/out", "secretRef": None}}, "spec.storage.uri", "pvc://"),
    ({"storage": {"uri": "./out", "secretRef": None}}, "spec.storage.uri", "rlhf run"),
    (
        {"storage": {"uri": "pvc://claim/x", "endpoint": "http://minio"}},
        "spec.storage.endpoint",
        "s3://",
    ),
    (
        {
            "cluster": {
                "workers": {"gpusPerWorker": 1, "resources": {"limits": {"nvidia.com/gpu": 2}}}
            }
        },
        "spec.cluster.workers.resources.limits['nvidia.com/gpu']",
        "gpusPerWorker",
    ),
    (
        {"cluster": {"workers": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}},
        "spec.cluster.workers.resources.requests['nvidia.com/gpu']",
        "gpusPerWorker is 0",
    ),
    (
        {"cluster": {"head": {"resources": {"limits": {"nvidia.com/gpu": 1}}}}},
        "spec.cluster.head.resources",
        "no GPU",
    ),
    (
        {"cluster": {"workers": {"resources": {"requests": {"memory": "16GB"}}}}},
        "spec.cluster.workers.resources.requests.memory",
        "16Gi",
    ),
    (
        {"cluster": {"head": {"resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "4"}}}}},
        "spec.cluster.head.resources.requests.cpu (8) exceeds",
        "limit",
    ),
    (
        {"cluster": {"serviceAccountName": "Bad_Account"}},
        "spec.cluster.serviceAccountName",
        "ServiceAccount",
    ),
    (
        {"cluster": {"workers": {"nodeSelector": {"pool": "gpu nodes"}}}},
        "spec.cluster.workers.nodeSelector.pool",
        "label value",
    ),
    (
        {"cluster": {"workers": {"nodeSelector": {"bad key!": "x"}}}},
        "spec.cluster.workers.nodeSelector",
        "label key",
    ),
    (
        {
            "cluster": {
                "workers": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}
            }
        },
        "spec.cluster.workers.tolerations[0].value",
        "Exists",
    ),
    (
        {"cluster": {"workers": {"tolerations": [{"value": "v"}]}}},
        "spec.cluster.workers.tolerations[0].key",
        "Exists",
    ),
    (
        {"cluster": {"workers": {"affinity": {"nodeAfinity": {}}}}},
        "spec.cluster.workers.affinity",
        "nodeAfinity",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field", "fix"), SEMANTIC_ERRORS, ids=[f for _, f, _ in SEMANTIC_ERRORS]
)
def test_semantic_checks_name_the_field_and_the_fix(spec: dict, field: str, fix: str) -> None:
    found = problems(**spec)
    assert any(field in p and fix in p for p in found), found


@pytest.mark.parametrize("name", ["a" * (names.MAX_JOB_NAME + 1), "9lives", "has.dot"])
def test_job_names_that_cannot_name_their_children(name: str) -> None:
    found = problems(name)
    assert found and all(p.startswith("metadata.name") for p in found), found


def test_the_longest_allowed_name_fits_kubes_limits() -> None:
    name = "a" * names.MAX_JOB_NAME
    assert problems(name) == []
    assert len(names.cluster_name(name)) <= names.KUBERAY_MAX_CLUSTER_NAME
    longest = names.rayjob_name(name, "evaluation", names.MAX_ATTEMPT)
    assert len(longest) <= names.KUBERAY_MAX_RAYJOB_NAME


def test_local_runs_accept_local_storage_and_any_name() -> None:
    manifest = sample_job("Local.Run", storage={"uri": "/tmp/out", "secretRef": None})
    job, found = validate(manifest, for_cluster=False)
    assert found == [] and job is not None


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        "x" * 40,
        storage={"uri": "/tmp/out", "secretRef": None},
        cluster={"workers": {"resources": {"requests": {"memory": "lots"}}}},
    )
    assert len(found) >= 3


def test_the_dpo_path_and_critic_free_algorithms_are_valid() -> None:
    job, found = validate(
        sample_job(
            "demo",
            stages={
                "reward": {"enabled": False, "model": "judge"},
                "ppo": {"enabled": False},
                "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8, "lossType": "ipo"},
                "evaluation": {"prompts": {"uri": "held-out"}},
            },
        )
    )
    assert found == []
    assert job.spec.enabled_stages() == ["sft", "dpo", "evaluation"]
    assert job.spec.stages.dpo.beta == 0.1  # TRL's default
    for algorithm in ("grpo", "rloo", "reinforce_pp"):
        job, found = validate(
            sample_job("demo", stages={"ppo": {"algorithm": algorithm, "samplesPerPrompt": 4}})
        )
        assert found == [] and not job.spec.stages.ppo.has_critic
    assert job.spec.stages.ppo.kl_placement == "reward"
    grpo = validate(
        sample_job("demo", stages={"ppo": {"algorithm": "grpo", "samplesPerPrompt": 4}})
    )
    assert grpo[0].spec.stages.ppo.kl_placement == "loss"  # GRPO's default: a k3 loss term


def test_without_dpo_the_stage_list_is_unchanged() -> None:
    job, _ = validate(sample_job("demo"))
    assert job.spec.stages.dpo is None
    assert job.spec.enabled_stages() == ["sft", "reward", "ppo", "evaluation"]
