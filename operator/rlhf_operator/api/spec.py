"""`RLHFJob.spec`: what to train, on what data, on which cluster, with which parallelism.

Cross-field rules are written once in ``RULES`` below: each is a CEL expression that goes into
the CRD (so the API server rejects a bad manifest at `kubectl apply`) and a Python predicate that
pydantic runs (so `rlhf run` and the operator reject the same manifest with the same message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from rlhf_operator.api.common import (
    ApiModel,
    EnvFromSource,
    EnvVar,
    NameRef,
    ResourceRequirements,
    SecretRef,
    Toleration,
)

DEFAULT_TRAINER_IMAGE = "ghcr.io/rlhf-operator/rlhf-trainer:0.1.0"

Precision = Literal["bf16", "fp16", "fp32"]
Offload = Literal["none", "optimizer", "parameters"]


# --------------------------------------------------------------------------- model, storage


class ModelSpec(ApiModel):
    """The base model every stage starts from."""

    base: str = Field(
        min_length=1,
        max_length=1024,
        description="Hugging Face model id (gpt2), local path, pvc://claim/path or s3://bucket/key.",
    )
    tokenizer: str | None = Field(
        default=None, max_length=1024, description="Tokenizer id or path; defaults to `base`."
    )
    revision: str | None = Field(
        default=None, max_length=256, description="Hub revision (branch, tag or commit) of `base`."
    )


class StorageSpec(ApiModel):
    """Where checkpoints, stage models and reports are written."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        description=(
            "s3://bucket/prefix, pvc://claim/subpath, or (local runs only) a directory path. "
            "Each stage writes to <uri>/<job>/<stage>/."
        ),
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret whose keys become env vars of the Ray pods (e.g. AWS_ACCESS_KEY_ID).",
    )
    endpoint: str | None = Field(
        default=None,
        max_length=2048,
        description="S3-compatible endpoint URL (MinIO, Nutanix Objects); AWS when empty.",
    )


# --------------------------------------------------------------------------- datasets


class DatasetSpec(ApiModel):
    """Common dataset location: a Hugging Face dataset id or a local JSON/JSONL/Parquet path."""

    uri: str = Field(
        min_length=1,
        description="Dataset id (imdb), a local or pvc:// path, or an fsspec URL "
        "(s3://bucket/prompts.jsonl, a prefix of files) of JSON/JSONL/CSV/Parquet.",
    )
    split: str = Field(default="train", description="Split to train on.")
    test_split: str | None = Field(
        default=None,
        description="Held-out split; when empty, `evalFraction` of `split` is held out.",
    )
    eval_fraction: float = Field(
        default=0.1, ge=0.0, le=0.5, description="Fraction held out when `testSplit` is empty."
    )


class SFTDataset(DatasetSpec):
    """Demonstrations: a prompt and the response to imitate."""

    prompt_field: str = Field(default="prompt", description="Column holding the prompt.")
    response_field: str = Field(default="response", description="Column holding the response.")


class PreferenceDataset(DatasetSpec):
    """Preference pairs: for one prompt, a chosen and a rejected response."""

    prompt_field: str | None = Field(
        default="prompt", description="Column holding the prompt; null when responses include it."
    )
    chosen_field: str = Field(default="chosen", description="Column of the preferred response.")
    rejected_field: str = Field(default="rejected", description="Column of the other response.")


class PromptDataset(DatasetSpec):
    """Prompts to generate from (PPO rollouts, evaluation)."""

    prompt_field: str = Field(default="prompt", description="Column holding the prompt.")
    truncation_side: Literal["left", "right"] = Field(
        default="right",
        description="Which end of a prompt longer than `maxPromptLen` tokens is cut: right keeps "
        "its opening (a review's first words, as TRL's IMDB example), left keeps its end "
        "(the last turn of a long conversation).",
    )


# --------------------------------------------------------------------------- stages


class TrainingSchedule(ApiModel):
    """Optimisation settings shared by the supervised stages (SFT, reward)."""

    epochs: int = Field(default=1, ge=1, le=100, description="Passes over the training split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (caps `epochs`)."
    )
    learning_rate: float = Field(default=1e-5, gt=0, le=1, description="AdamW peak learning rate.")
    warmup_ratio: float = Field(
        default=0.0, ge=0, le=0.5, description="Fraction of steps with linear LR warm-up."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    batch_size: int = Field(
        default=32, ge=1, description="Global batch size per optimizer step, over all workers."
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Per-worker batch per forward pass; the rest is gradient accumulation. "
        "Defaults to batchSize / workers.",
    )
    max_seq_len: int = Field(default=512, ge=8, le=131072, description="Tokens per sequence.")
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Save a resumable checkpoint every this many steps."
    )


class SFTStage(TrainingSchedule):
    """Supervised fine-tuning of the base model on demonstrations (loss on response tokens)."""

    enabled: bool = Field(default=True, description="Run this stage.")
    dataset: SFTDataset | None = Field(default=None, description="Demonstrations to imitate.")


class RewardStage(TrainingSchedule):
    """Reward model: a scalar head on the SFT (or base) backbone, trained on preference pairs."""

    enabled: bool = Field(default=True, description="Run this stage.")
    dataset: PreferenceDataset | None = Field(default=None, description="Preference pairs.")
    model: str | None = Field(
        default=None,
        description="A pretrained reward model (id or path): training is skipped and PPO uses it.",
    )
    positive_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Label of the pretrained classifier `model` whose logit is the reward (a name "
        "in its config's id2label, e.g. POSITIVE). Empty: the only output of a one-label model; "
        "of a two-label model the label named positive (any case) or LABEL_1, else label 1. "
        "Required for three labels or more.",
    )


class GenerationSpec(ApiModel):
    """Sampling settings for rollouts and evaluation."""

    max_new_tokens: int = Field(default=64, ge=1, le=8192, description="Tokens generated.")
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature.")
    top_k: int = Field(default=0, ge=0, description="Top-k sampling; 0 disables it.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling; 1 disables it.")


Algorithm = Literal["ppo", "grpo", "rloo", "reinforce_pp"]
CRITIC_FREE: tuple[str, ...] = ("grpo", "rloo", "reinforce_pp")
GROUP_BASELINE: tuple[str, ...] = ("grpo", "rloo")
"""Algorithms whose baseline is the other responses to the same prompt."""
# Critic-only settings: empty in the manifest (so that a critic-free job that sets one is
# refused), these defaults when PPO runs.
DEFAULT_VALUE_CLIP_RANGE = 0.2
DEFAULT_VALUE_LOSS_COEF = 0.1
DEFAULT_LAM = 0.95
CRITIC_FIELDS: tuple[tuple[str, str], ...] = (
    ("value_learning_rate", "valueLearningRate"),
    ("value_clip_range", "valueClipRange"),
    ("value_loss_coef", "valueLossCoef"),
    ("lam", "lam"),
)


RolloutEngineName = Literal["hf", "vllm"]


class VLLMSpec(ApiModel):
    """The vLLM engine's settings (`engine: vllm`); it runs in each worker beside the policy."""

    gpu_memory_utilization: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="Fraction of each GPU vLLM may take for weights and KV cache (the rest is "
        "training's). CPU workers: the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (default 1).",
    )
    max_num_seqs: int = Field(
        default=256, ge=1, le=65536, description="Most sequences vLLM decodes in one batch."
    )
    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks sharing one vLLM engine (tensor parallel); divides "
        "spec.cluster.workers.replicas x gpusPerWorker.",
    )
    enable_prefix_caching: bool = Field(
        default=False, description="Reuse the KV cache of shared prompt prefixes."
    )


class RolloutSpec(ApiModel):
    """Which engine samples responses: transformers' generate, or vLLM (PagedAttention,
    continuous batching) with the policy's weights loaded into it before every rollout."""

    engine: RolloutEngineName = Field(
        default="hf",
        description="hf: transformers generate; vllm: vLLM colocated with the policy "
        "(needs the trainer's vllm extra).",
    )
    vllm: VLLMSpec = Field(default_factory=VLLMSpec, description="vLLM settings.")


class PPOStage(ApiModel):
    """The RL stage: the SFT policy optimised against the reward model by PPO (a learned value
    model) or a critic-free policy-gradient method (`algorithm`)."""

    enabled: bool = Field(default=True, description="Run this stage.")
    algorithm: Algorithm = Field(
        default="ppo",
        description="ppo: clipped policy loss with a value model and GAE. grpo: advantages "
        "normalised within each prompt's group of `samplesPerPrompt` responses, KL to the "
        "reference as a k3 loss term (`klIn`). rloo: leave-one-out baseline within the group, "
        "KL in the reward. reinforce_pp: REINFORCE++, token-level KL in the reward, returns "
        "whitened over the global batch. Critic-free algorithms build no value model.",
    )
    samples_per_prompt: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Responses sampled per prompt and iteration (the group of grpo and rloo, "
        "which need 2 or more); an iteration has rolloutBatchSize x samplesPerPrompt rollouts.",
    )
    kl_in: Literal["loss", "reward"] | None = Field(
        default=None,
        description="Where the KL to the reference goes: `loss` (k3 estimate times klCoef "
        "added to the policy loss; grpo only, its default) or `reward` (k1 per token; every "
        "other algorithm's default).",
    )
    prompts: PromptDataset | None = Field(default=None, description="Prompts for rollouts.")
    steps: int = Field(default=100, ge=1, description="PPO iterations (rollout + update).")
    rollout_batch_size: int = Field(
        default=64, ge=1, description="Prompts sampled per iteration, over all workers."
    )
    mini_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Per-worker minibatch of a PPO update; whole shard if empty.",
    )
    rollout_micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Per-worker sequences generated and scored in one forward pass: bounds "
        "rollout memory whatever rolloutBatchSize is; whole shard if empty.",
    )
    ppo_epochs: int = Field(default=4, ge=1, le=64, description="Passes over each rollout batch.")
    learning_rate: float = Field(default=1e-6, gt=0, le=1, description="Policy learning rate.")
    value_learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Value-model learning rate (ppo only); defaults to the policy's.",
    )
    kl_coef: float = Field(default=0.05, ge=0, description="Initial KL penalty coefficient.")
    target_kl: float | None = Field(
        default=None,
        gt=0,
        description="Adaptive KL control target (Ziegler et al.); empty keeps `klCoef` fixed.",
    )
    kl_horizon: int = Field(default=10000, ge=1, description="Adaptive KL controller horizon.")
    clip_range: float = Field(default=0.2, gt=0, le=1, description="Policy ratio clip.")
    value_clip_range: float | None = Field(
        default=None, gt=0, description="Value prediction clip (ppo only); 0.2 when empty."
    )
    value_loss_coef: float | None = Field(
        default=None, ge=0, description="Weight of the value loss (ppo only); 0.1 when empty."
    )
    gamma: float = Field(
        default=1.0, ge=0, le=1, description="Discount factor (1 for grpo and rloo)."
    )
    lam: float | None = Field(
        default=None, ge=0, le=1, description="GAE lambda (ppo only); 0.95 when empty."
    )
    max_prompt_len: int = Field(
        default=256,
        ge=1,
        description="Prompt tokens kept; the prompts' `truncationSide` says which end is cut.",
    )
    missing_eos_penalty: float | None = Field(
        default=None,
        ge=0,
        description="Subtracted from the reward-model score of a rollout that ends without EOS "
        "(cut at `generation.maxNewTokens`), as TRL's `missing_eos_penalty`: the reward model "
        "was trained on complete responses. Empty: no penalty.",
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Sampling for rollouts."
    )
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, description="Engine that samples the rollouts."
    )
    checkpoint_every_steps: int = Field(
        default=20, ge=1, description="Save a resumable checkpoint every this many iterations."
    )

    @property
    def has_critic(self) -> bool:
        """Whether this algorithm trains a value model (only PPO does)."""
        return self.algorithm not in CRITIC_FREE

    @property
    def kl_placement(self) -> Literal["loss", "reward"]:
        """`klIn`, or the algorithm's default: GRPO's KL is a loss term, the others' a reward."""
        return self.kl_in or ("loss" if self.algorithm == "grpo" else "reward")

    @property
    def value_clip(self) -> float:
        return DEFAULT_VALUE_CLIP_RANGE if self.value_clip_range is None else self.value_clip_range

    @property
    def value_coef(self) -> float:
        return DEFAULT_VALUE_LOSS_COEF if self.value_loss_coef is None else self.value_loss_coef

    @property
    def gae_lambda(self) -> float:
        return DEFAULT_LAM if self.lam is None else self.lam


class DPOStage(TrainingSchedule):
    """Direct Preference Optimisation of the SFT policy on preference pairs, against the frozen
    SFT policy as reference: the path SFT -> DPO -> evaluation, without reward model or PPO."""

    enabled: bool = Field(default=True, description="Run this stage (present = enabled).")
    dataset: PreferenceDataset | None = Field(default=None, description="Preference pairs.")
    learning_rate: float = Field(default=1e-6, gt=0, le=1, description="AdamW peak learning rate.")
    beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="Strength of the implicit KL to the reference (sigmoid: the logit scale; "
        "ipo: the target margin is 1 / (2 beta)).",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid",
        description="sigmoid: DPO (Rafailov et al.), summed log-probs. ipo: IPO (Azar et al.), "
        "log-probs averaged over response tokens (as TRL).",
    )


JUDGE_RULES: tuple[tuple[str, Callable[[JudgeSpec], bool], str], ...] = (
    (
        "has(self.model) != has(self.lexicon)",
        lambda j: (j.model is None) != (j.lexicon is None),
        "spec.stages.evaluation.judge: set exactly one of model (a classifier or reward model) "
        "and lexicon (a word-weight file).",
    ),
    (
        "!has(self.positiveLabel) || has(self.model)",
        lambda j: j.positive_label is None or j.model is not None,
        "spec.stages.evaluation.judge.positiveLabel picks a label of the judge model; set "
        "judge.model or remove positiveLabel.",
    ),
)
"""The judge's own rules: CEL on its schema for the API server, predicates for pydantic."""


class JudgeSpec(ApiModel):
    """A second scorer of the evaluation, independent of the reward model PPO optimised: a win
    by the reward model alone may be reward hacking; a win by the judge too is not."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": cel, "message": message} for cel, _, message in JUDGE_RULES
            ]
        }
    }

    name: str | None = Field(
        default=None,
        max_length=128,
        description="What the judge is, in the reports (e.g. 'true sentiment count'); defaults "
        "to its model or lexicon path.",
    )
    model: str | None = Field(
        default=None,
        max_length=1024,
        description="A sequence classifier or reward model (id or path) other than the one PPO "
        "optimised, e.g. a sentiment classifier for IMDB; scores `prompt + response` with its "
        "own tokenizer.",
    )
    positive_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Label of the judge `model` whose logit is the score (same rule as "
        "spec.stages.reward.positiveLabel).",
    )
    lexicon: str | None = Field(
        default=None,
        max_length=2048,
        description="A JSON file {word: weight}: the score of a text is the sum of the weights "
        "of its whitespace-separated words (a rule-based judge, for tasks with a known true "
        "score such as the tiny example's sentiment count).",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> JudgeSpec:
        broken = [message for _, check, message in JUDGE_RULES if not check(self)]
        if broken:
            raise ValueError(" ".join(broken))
        return self

    def display_name(self) -> str:
        """What the reports (summary, status, examples) call the judge."""
        if self.name:
            return self.name
        return f"lexicon {self.lexicon}" if self.lexicon else f"model {self.model}"


class EvaluationStage(ApiModel):
    """Compare the SFT policy with the tuned (PPO or DPO) policy on held-out prompts, scored by
    the reward model (and by an independent judge when one is set)."""

    enabled: bool = Field(default=True, description="Run this stage.")
    prompts: PromptDataset | None = Field(
        default=None,
        description="Held-out prompts; defaults to the held-out part of PPO prompts (required "
        "with dpo).",
    )
    num_prompts: int = Field(
        default=64,
        ge=1,
        description="Prompts evaluated: a seeded random sample (spec.seed) of the held-out rows.",
    )
    samples_per_prompt: int = Field(
        default=4, ge=1, le=64, description="Responses sampled per prompt and policy."
    )
    generation: GenerationSpec | None = Field(
        default=None, description="Sampling settings; defaults to PPO's."
    )
    judge: JudgeSpec | None = Field(
        default=None,
        description="An independent judge scoring both policies beside the reward model; its "
        "win rate shows whether PPO's gains are real or reward hacking.",
    )
    rollout: RolloutSpec | None = Field(
        default=None, description="Engine that samples the responses; defaults to PPO's."
    )


class Stages(ApiModel):
    """The pipeline; enabled stages run in this order: sft, reward, ppo, dpo, evaluation."""

    sft: SFTStage = Field(default_factory=SFTStage, description="Supervised fine-tuning.")
    reward: RewardStage = Field(default_factory=RewardStage, description="Reward model.")
    ppo: PPOStage = Field(
        default_factory=PPOStage, description="RL: PPO, GRPO, RLOO or REINFORCE++."
    )
    dpo: DPOStage | None = Field(
        default=None,
        description="DPO instead of reward model and PPO (runs when present; disable "
        "spec.stages.reward and spec.stages.ppo).",
    )
    evaluation: EvaluationStage = Field(default_factory=EvaluationStage, description="Evaluation.")

    def enabled(self, name: str) -> bool:
        stage = getattr(self, name)
        return stage is not None and stage.enabled


# --------------------------------------------------------------------------- cluster


class HeadSpec(ApiModel):
    """The Ray head pod (schedules work, runs stage drivers; no GPU)."""

    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "2", "memory": "8Gi"}, limits={"memory": "8Gi"}
        ),
        description="Head container resources.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the head must run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the head tolerates."
    )


class WorkerSpec(ApiModel):
    """The Ray worker group: pods of `gpusPerWorker` GPUs, one training rank per GPU."""

    replicas: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Worker pods; ranks = replicas x gpusPerWorker (replicas on CPU).",
    )
    gpus_per_worker: int = Field(
        default=0,
        ge=0,
        le=16,
        description="`nvidia.com/gpu` per worker pod, one training rank each; 0 trains on CPU.",
    )
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "4", "memory": "16Gi"}, limits={"memory": "16Gi"}
        ),
        description="Worker container resources (GPUs come from `gpusPerWorker`).",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the workers must run on."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the workers tolerate (e.g. GPU node pools)."
    )
    affinity: dict | None = Field(
        default=None,
        description="A Kubernetes Affinity object for the workers (node/pod (anti-)affinity).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class ClusterSpec(ApiModel):
    """The Ray cluster (KubeRay RayCluster) that runs every stage of the job."""

    image: str = Field(
        default=DEFAULT_TRAINER_IMAGE,
        min_length=1,
        description="Trainer image for head and workers.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Image pull policy of the Ray pods."
    )
    service_account_name: str | None = Field(
        default=None,
        description="ServiceAccount of the Ray pods (progress reporting); the chart's trainer "
        "account when empty.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Environment of the head and worker containers (e.g. NCCL_* settings, "
        "HF_TOKEN through valueFrom.secretKeyRef). Secrets are referenced by name, never copied.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list,
        description="Secrets or ConfigMaps whose every key becomes an environment variable of "
        "the head and worker containers (referenced by name).",
    )
    image_pull_secrets: list[NameRef] = Field(
        default_factory=list,
        description="Secrets for pulling the trainer image from a private registry (Ray pods "
        "and the stage submitter pods).",
    )
    head: HeadSpec = Field(default_factory=HeadSpec, description="Ray head pod.")
    workers: WorkerSpec = Field(default_factory=WorkerSpec, description="Ray worker group.")
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue (in the job's namespace) that admits the RayCluster as "
        "one gang (label kueue.x-k8s.io/queue-name); the job shows Queued until Kueue admits "
        "it. Empty: not queued.",
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="PriorityClass of the Ray pods: their scheduling priority, and the "
        "priority Kueue gives the RayCluster's workload in its queue.",
    )
    provision_timeout_seconds: int = Field(
        default=1800,
        ge=60,
        le=86400,
        description="Fail the job when its RayCluster is not ready this long after it was "
        "requested (unschedulable GPUs, image pull errors, a missing ServiceAccount), with "
        "KubeRay's reason; the partly scheduled cluster is deleted.",
    )


# --------------------------------------------------------------------------- parallelism, policy


class LoraSpec(ApiModel):
    """LoRA adapters (PEFT) instead of full fine-tuning of PPO's policy and value model."""

    rank: int = Field(default=8, ge=1, le=1024, description="Rank of the adapter matrices.")
    alpha: float = Field(
        default=16, gt=0, le=4096, description="Scale: adapters add (alpha / rank) * B @ A."
    )
    target_modules: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Module names that get adapters (c_attn, q_proj, ...); PEFT's default for "
        "the architecture if empty.",
    )


class ParallelismSpec(ApiModel):
    """How each stage is sharded over the workers (DeepSpeed ZeRO data parallelism)."""

    strategy: Literal["deepspeed"] = Field(
        default="deepspeed", description="Sharding engine (DeepSpeed ZeRO)."
    )
    zero_stage: int = Field(
        default=2, ge=0, le=3, description="ZeRO stage: 0 none, 1 optimizer, 2 +grads, 3 +params."
    )
    offload: Offload = Field(
        default="none", description="Offload to CPU: optimizer states, or parameters too (ZeRO-3)."
    )
    precision: Precision = Field(default="bf16", description="Training precision.")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward to save memory."
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="Train LoRA adapters on PPO's policy and value model; the reference model "
        "is the policy with its adapters off (one copy of the base weights). Full fine-tuning "
        "if empty.",
    )


class WarmPoolSpec(ApiModel):
    """Keep the finished job's Ray cluster warm for the next job with the same shape."""

    keep_alive_seconds: int = Field(
        default=0,
        ge=0,
        le=86400,
        description="Seconds a finished cluster stays claimable; 0 = delete.",
    )
    pool: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Explicit pool name: only jobs naming the same pool share clusters.",
    )


class RunPolicy(ApiModel):
    """Retries, deadlines, clean-up and suspension."""

    backoff_limit: int = Field(
        default=2, ge=0, le=20, description="Retries per stage before the job fails."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job if it runs longer than this."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the RLHFJob this long after it finished."
    )
    suspend: bool = Field(
        default=False, description="Suspend: stop the running stage and release the cluster."
    )
    keep_attempts: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Finished RayJobs (with their submitter pods and logs) kept per stage, "
        "newest first; older attempts' RayJobs are deleted.",
    )


# --------------------------------------------------------------------------- cross-field rules


@dataclass(frozen=True)
class Rule:
    """One cross-field rule: CEL for the API server, a predicate for Python. Same message."""

    cel: str
    check: Callable[[RLHFJobSpec], bool]
    message: str
    field_path: str


def ranks(spec: RLHFJobSpec) -> int:
    """Data-parallel ranks (Ray Train workers): one per GPU, one per pod on CPU."""
    workers = spec.cluster.workers
    return workers.replicas * max(workers.gpus_per_worker, 1)


RANKS_CEL = (
    "(self.cluster.workers.replicas * (self.cluster.workers.gpusPerWorker > 0 ?"
    " self.cluster.workers.gpusPerWorker : 1))"
)
RANKS_TEXT = "spec.cluster.workers.replicas x gpusPerWorker (one rank per GPU)"


def _divides(schedule: TrainingSchedule, replicas: int) -> bool:
    micro = schedule.micro_batch_size or max(schedule.batch_size // replicas, 1)
    return schedule.batch_size % (micro * replicas) == 0


def _divides_cel(stage: str) -> str:
    s, r = f"self.stages.{stage}", RANKS_CEL
    return (
        f"has({s}.microBatchSize) ? {s}.batchSize % ({s}.microBatchSize * {r}) == 0"
        f" : {s}.batchSize % {r} == 0"
    )


_DPO_CEL = "(has(self.stages.dpo) && self.stages.dpo.enabled)"
_PPO = "self.stages.ppo"


def _critic_free_cel(camel: str) -> str:
    return f"{_PPO}.algorithm == 'ppo' || !has({_PPO}.{camel})"


RULES: tuple[Rule, ...] = (
    Rule(
        cel="self.stages.sft.enabled || self.stages.reward.enabled || self.stages.ppo.enabled"
        f" || {_DPO_CEL} || self.stages.evaluation.enabled",
        check=lambda s: any(s.stages.enabled(name) for name in STAGE_ORDER),
        message="spec.stages: every stage is disabled; enable at least one stage.",
        field_path=".stages",
    ),
    Rule(
        cel="!self.stages.sft.enabled || has(self.stages.sft.dataset)",
        check=lambda s: not s.stages.sft.enabled or s.stages.sft.dataset is not None,
        message="spec.stages.sft.dataset is required when SFT is enabled; set it or set "
        "spec.stages.sft.enabled: false.",
        field_path=".stages.sft.dataset",
    ),
    Rule(
        cel="!self.stages.reward.enabled || has(self.stages.reward.model)"
        " || has(self.stages.reward.dataset)",
        check=lambda s: (
            not s.stages.reward.enabled
            or s.stages.reward.model is not None
            or s.stages.reward.dataset is not None
        ),
        message="spec.stages.reward.dataset is required to train a reward model; set it, or set "
        "spec.stages.reward.model to a pretrained reward model.",
        field_path=".stages.reward.dataset",
    ),
    Rule(
        cel="!has(self.stages.reward.positiveLabel) || has(self.stages.reward.model)",
        check=lambda s: s.stages.reward.positive_label is None or s.stages.reward.model is not None,
        message="spec.stages.reward.positiveLabel picks a label of a pretrained classifier: set "
        "spec.stages.reward.model too, or remove positiveLabel (a trained reward model has one "
        "output).",
        field_path=".stages.reward.positiveLabel",
    ),
    Rule(
        cel="!self.stages.ppo.enabled || self.stages.reward.enabled"
        " || has(self.stages.reward.model)",
        check=lambda s: (
            not s.stages.ppo.enabled or s.stages.reward.enabled or s.stages.reward.model is not None
        ),
        message="spec.stages.ppo needs a reward model: enable spec.stages.reward or set "
        "spec.stages.reward.model to a pretrained reward model.",
        field_path=".stages.reward",
    ),
    Rule(
        cel="!self.stages.ppo.enabled || has(self.stages.ppo.prompts)",
        check=lambda s: not s.stages.ppo.enabled or s.stages.ppo.prompts is not None,
        message="spec.stages.ppo.prompts is required when PPO is enabled; set it or set "
        "spec.stages.ppo.enabled: false.",
        field_path=".stages.ppo.prompts",
    ),
    Rule(
        cel=f"!self.stages.evaluation.enabled || self.stages.ppo.enabled || {_DPO_CEL}",
        check=lambda s: (
            not s.stages.evaluation.enabled or s.stages.ppo.enabled or s.stages.enabled("dpo")
        ),
        message="spec.stages.evaluation compares the PPO (or DPO) policy with the SFT policy: "
        "enable spec.stages.ppo or spec.stages.dpo, or set spec.stages.evaluation.enabled: false.",
        field_path=".stages.evaluation.enabled",
    ),
    # ---- the RL stage's algorithm
    Rule(
        cel=f"!({_PPO}.algorithm in ['grpo', 'rloo']) || {_PPO}.samplesPerPrompt >= 2",
        check=lambda s: (
            s.stages.ppo.algorithm not in GROUP_BASELINE or s.stages.ppo.samples_per_prompt >= 2
        ),
        message="spec.stages.ppo.samplesPerPrompt must be 2 or more for algorithm grpo or rloo "
        "(the baseline is the other responses to the same prompt); set it to e.g. 4.",
        field_path=".stages.ppo.samplesPerPrompt",
    ),
    Rule(
        cel=f"!has({_PPO}.klIn) || {_PPO}.klIn != 'loss' || {_PPO}.algorithm == 'grpo'",
        check=lambda s: s.stages.ppo.kl_in != "loss" or s.stages.ppo.algorithm == "grpo",
        message="spec.stages.ppo.klIn: loss is GRPO's KL term; with algorithm ppo, rloo or "
        "reinforce_pp the KL is in the reward: remove klIn or set it to reward.",
        field_path=".stages.ppo.klIn",
    ),
    Rule(
        cel=f"!({_PPO}.algorithm in ['grpo', 'rloo']) || {_PPO}.gamma == 1.0",
        check=lambda s: s.stages.ppo.algorithm not in GROUP_BASELINE or s.stages.ppo.gamma == 1.0,
        message="spec.stages.ppo.gamma: grpo and rloo score whole responses (gamma 1); remove "
        "gamma or use algorithm reinforce_pp or ppo for discounting.",
        field_path=".stages.ppo.gamma",
    ),
    *(
        Rule(
            cel=_critic_free_cel(camel),
            check=lambda s, snake=snake: (
                s.stages.ppo.algorithm == "ppo" or getattr(s.stages.ppo, snake) is None
            ),
            message=f"spec.stages.ppo.{camel} configures the value model, which only algorithm "
            f"ppo has; remove {camel} or set spec.stages.ppo.algorithm: ppo.",
            field_path=f".stages.ppo.{camel}",
        )
        for snake, camel in CRITIC_FIELDS
    ),
    # ---- DPO: the path without reward model and PPO
    Rule(
        cel=f"!{_DPO_CEL} || !self.stages.ppo.enabled",
        check=lambda s: not s.stages.enabled("dpo") or not s.stages.ppo.enabled,
        message="spec.stages.dpo replaces PPO: set spec.stages.ppo.enabled: false, or remove "
        "spec.stages.dpo.",
        field_path=".stages.ppo.enabled",
    ),
    Rule(
        cel=f"!{_DPO_CEL} || !self.stages.reward.enabled || has(self.stages.reward.model)",
        check=lambda s: (
            not s.stages.enabled("dpo")
            or not s.stages.reward.enabled
            or s.stages.reward.model is not None
        ),
        message="spec.stages.dpo trains on preference pairs directly, without a reward model: "
        "set spec.stages.reward.enabled: false (or give a pretrained spec.stages.reward.model "
        "for evaluation to score with).",
        field_path=".stages.reward.enabled",
    ),
    Rule(
        cel=f"!{_DPO_CEL} || has(self.stages.dpo.dataset)",
        check=lambda s: not s.stages.enabled("dpo") or s.stages.dpo.dataset is not None,
        message="spec.stages.dpo.dataset is required: the preference pairs (prompt, chosen, "
        "rejected) DPO trains on.",
        field_path=".stages.dpo.dataset",
    ),
    Rule(
        cel=f"!{_DPO_CEL} || !self.stages.evaluation.enabled || has(self.stages.reward.model)",
        check=lambda s: (
            not s.stages.enabled("dpo")
            or not s.stages.evaluation.enabled
            or s.stages.reward.model is not None
        ),
        message="spec.stages.evaluation scores with a reward model, and spec.stages.dpo trains "
        "none: set spec.stages.reward.model to a pretrained one, or set "
        "spec.stages.evaluation.enabled: false.",
        field_path=".stages.reward.model",
    ),
    Rule(
        cel=f"!{_DPO_CEL} || !self.stages.evaluation.enabled"
        " || has(self.stages.evaluation.prompts)",
        check=lambda s: (
            not s.stages.enabled("dpo")
            or not s.stages.evaluation.enabled
            or s.stages.evaluation.prompts is not None
        ),
        message="spec.stages.evaluation.prompts is required with spec.stages.dpo (the default, "
        "PPO's held-out prompts, does not exist without PPO); set it.",
        field_path=".stages.evaluation.prompts",
    ),
    Rule(
        cel="!has(self.stages.evaluation.judge) || !has(self.stages.evaluation.judge.model)"
        " || !has(self.stages.reward.model)"
        " || self.stages.evaluation.judge.model != self.stages.reward.model",
        check=lambda s: (
            s.stages.evaluation.judge is None
            or s.stages.evaluation.judge.model is None
            or s.stages.evaluation.judge.model != s.stages.reward.model
        ),
        message="spec.stages.evaluation.judge.model is the reward model PPO optimised "
        "(spec.stages.reward.model); an independent judge must be another model.",
        field_path=".stages.evaluation.judge.model",
    ),
    Rule(
        cel="self.parallelism.offload != 'parameters' || self.parallelism.zeroStage == 3",
        check=lambda s: s.parallelism.offload != "parameters" or s.parallelism.zero_stage == 3,
        message="spec.parallelism.offload: parameters requires spec.parallelism.zeroStage: 3.",
        field_path=".parallelism.offload",
    ),
    Rule(
        cel="self.parallelism.offload != 'optimizer' || self.parallelism.zeroStage >= 1",
        check=lambda s: s.parallelism.offload != "optimizer" or s.parallelism.zero_stage >= 1,
        message="spec.parallelism.offload: optimizer requires spec.parallelism.zeroStage >= 1.",
        field_path=".parallelism.offload",
    ),
    Rule(
        cel="self.parallelism.precision != 'fp16' || self.cluster.workers.gpusPerWorker > 0",
        check=lambda s: s.parallelism.precision != "fp16" or s.cluster.workers.gpus_per_worker > 0,
        message="spec.parallelism.precision: fp16 needs GPUs; use bf16 or fp32 on CPU workers "
        "(spec.cluster.workers.gpusPerWorker: 0).",
        field_path=".parallelism.precision",
    ),
    *(
        Rule(
            cel=_divides_cel(stage),
            check=lambda s, stage=stage: _divides(getattr(s.stages, stage), ranks(s)),
            message=f"spec.stages.{stage}.batchSize must be a multiple of microBatchSize x "
            f"{RANKS_TEXT}; change the batch size or the micro-batch size.",
            field_path=f".stages.{stage}.batchSize",
        )
        for stage in ("sft", "reward")
    ),
    Rule(
        cel=f"!{_DPO_CEL} || ({_divides_cel('dpo')})",
        check=lambda s: not s.stages.enabled("dpo") or _divides(s.stages.dpo, ranks(s)),
        message="spec.stages.dpo.batchSize must be a multiple of microBatchSize x "
        f"{RANKS_TEXT}; change the batch size or the micro-batch size.",
        field_path=".stages.dpo.batchSize",
    ),
    Rule(
        cel=f"self.stages.ppo.rolloutBatchSize % {RANKS_CEL} == 0",
        check=lambda s: s.stages.ppo.rollout_batch_size % ranks(s) == 0,
        message="spec.stages.ppo.rolloutBatchSize must be a multiple of "
        f"{RANKS_TEXT}: each rank rolls out an equal share.",
        field_path=".stages.ppo.rolloutBatchSize",
    ),
    Rule(
        cel=f"{RANKS_CEL} % self.stages.ppo.rollout.vllm.tensorParallelSize == 0",
        check=lambda s: ranks(s) % s.stages.ppo.rollout.vllm.tensor_parallel_size == 0,
        message="spec.stages.ppo.rollout.vllm.tensorParallelSize must divide "
        f"{RANKS_TEXT}: each group of that many ranks shares one engine.",
        field_path=".stages.ppo.rollout.vllm.tensorParallelSize",
    ),
    Rule(
        cel="!has(self.stages.evaluation.rollout) || "
        f"{RANKS_CEL} % self.stages.evaluation.rollout.vllm.tensorParallelSize == 0",
        check=lambda s: (
            s.stages.evaluation.rollout is None
            or ranks(s) % s.stages.evaluation.rollout.vllm.tensor_parallel_size == 0
        ),
        message="spec.stages.evaluation.rollout.vllm.tensorParallelSize must divide "
        f"{RANKS_TEXT}: each group of that many ranks shares one engine.",
        field_path=".stages.evaluation.rollout.vllm.tensorParallelSize",
    ),
    Rule(
        # vLLM takes the policy's weights by their transformers names; a LoRA policy is a
        # PeftModel (base_layer/lora_A names) vLLM cannot load. Evaluation is unaffected: it
        # samples the saved (merged) policy.
        cel="!self.stages.ppo.enabled || !has(self.parallelism.lora)"
        " || self.stages.ppo.rollout.engine != 'vllm'",
        check=lambda s: (
            not s.stages.ppo.enabled
            or s.parallelism.lora is None
            or s.stages.ppo.rollout.engine != "vllm"
        ),
        message="spec.stages.ppo.rollout.engine: vllm cannot sample from a LoRA policy "
        "(spec.parallelism.lora): set engine: hf, or remove spec.parallelism.lora.",
        field_path=".stages.ppo.rollout.engine",
    ),
)


# --------------------------------------------------------------------------- the spec


IMMUTABLE_FIELDS = ("model", "storage", "parallelism")
"""spec fields the API server refuses to change once a job exists (CEL `self == oldSelf`)."""


def _immutable(field: str) -> dict:
    """CEL transition rule: a running pipeline cannot change what it trains or where."""
    assert field in IMMUTABLE_FIELDS
    return {
        "x-kubernetes-validations": [
            {
                "rule": "self == oldSelf",
                "message": f"spec.{field} is immutable; create a new RLHFJob to change it.",
            }
        ]
    }


class RLHFJobSpec(ApiModel):
    """Desired state of an RLHFJob: one pipeline SFT -> reward -> PPO (or SFT -> DPO) ->
    evaluation."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                {"rule": r.cel, "message": r.message, "fieldPath": r.field_path} for r in RULES
            ]
        }
    }

    model: ModelSpec = Field(description="Base model.", json_schema_extra=_immutable("model"))
    storage: StorageSpec = Field(
        description="Artifact and checkpoint storage.", json_schema_extra=_immutable("storage")
    )
    # stages and cluster hold unbounded lists and maps: a CEL `==` on them would exceed the API
    # server's cost budget, so the operator (not CEL) ignores their changes after start.
    stages: Stages = Field(default_factory=Stages, description="Pipeline stages.")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec, description="Ray cluster.")
    parallelism: ParallelismSpec = Field(
        default_factory=ParallelismSpec,
        description="DeepSpeed ZeRO settings.",
        json_schema_extra=_immutable("parallelism"),
    )
    warm_pool: WarmPoolSpec = Field(
        default_factory=WarmPoolSpec, description="Reuse of finished clusters across jobs."
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries and lifecycle.")
    seed: int = Field(default=42, ge=0, description="Random seed of every stage.")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> RLHFJobSpec:
        broken = [r.message for r in RULES if not r.check(self)]
        if broken:
            raise ValueError(" ".join(broken))
        return self

    def enabled_stages(self) -> list[str]:
        """Names of the enabled stages, in pipeline order."""
        return [name for name in STAGE_ORDER if self.stages.enabled(name)]


# The one list of stages (operator state machine, trainer CLI, status columns, metrics).
STAGE_ORDER: tuple[str, ...] = ("sft", "reward", "ppo", "dpo", "evaluation")
StageName = Literal["sft", "reward", "ppo", "dpo", "evaluation"]
OPTIONAL_STAGES: tuple[str, ...] = ("dpo",)
"""Stages that run only when present in the spec (the others run unless `enabled: false`)."""
