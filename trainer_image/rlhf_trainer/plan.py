"""`rlhf plan job.yaml`: each stage's memory per GPU and per host, before any GPU is paid for.

For every enabled stage the models it holds (SFT: the policy; reward: a scalar-head model; PPO:
policy and value trained, reference and reward model frozen, or with LoRA one base under the
policy's adapters; GRPO/RLOO/REINFORCE++: the same without a value model; DPO: the policy
trained, its SFT copy frozen; evaluation: three frozen models) are sized from their config
alone: the architecture is built on PyTorch's meta device (no weights, no memory) to count
parameters and find the largest layer. Model states of trained models come from DeepSpeed's own
estimators (`estimate_zero2_model_states_mem_needs` for ZeRO-1/2, `estimate_zero3_...` for
ZeRO-3; they count 16-bit weights and gradients, fp32 master weights and Adam moments); ZeRO-0
and fp32 count the buffers DeepSpeed's optimizers allocate (`optimizer_bytes_per_param`). Added
on top: activations of one micro-batch (the logits and per-layer activations of a
forward/backward, or the KV cache of generation), under ZeRO-3 the parameters gathered whole
(`zero3_gathered`) and a fixed per-process overhead (CUDA context and allocator slack on a GPU;
interpreter, torch, DeepSpeed and Ray on the host). These are estimates: `bench/memory.py`
prints them beside measured peaks.

Where the config comes from (no weights are downloaded): `--model-config` (a config.json or a
directory holding one), a local model directory, the built-in table `KNOWN_CONFIGS` (the
examples' hub models), else transformers' AutoConfig from the Hugging Face cache or hub.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_trainer.jobspec import UserError

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob
    from rlhf_operator.api.spec import ParallelismSpec

GiB = 1024**3

# Configs of the examples' hub models (their config.json, trimmed to what sizes the model), so
# `rlhf plan` works offline. Parameter counts are computed from these, not copied.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12},
    "lvwerra/gpt2-imdb": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12},
    "gpt2-medium": {"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "gpt2-large": {"model_type": "gpt2", "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "lvwerra/distilbert-imdb": {
        "model_type": "distilbert",
        "dim": 768,
        "n_layers": 6,
        "n_heads": 12,
        "hidden_dim": 3072,
        "vocab_size": 30522,
        "num_labels": 2,
    },
    "EleutherAI/gpt-j-6b": {
        "model_type": "gptj",
        "n_embd": 4096,
        "n_layer": 28,
        "n_head": 16,
        "rotary_dim": 64,
        "vocab_size": 50400,
        "n_positions": 2048,
        "tie_word_embeddings": False,
    },
    "EleutherAI/pythia-6.9b": {
        "model_type": "gpt_neox",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 16384,
        "vocab_size": 50432,
        "max_position_embeddings": 2048,
        "rotary_pct": 0.25,
        "tie_word_embeddings": False,
    },
}

# Per-process overheads beside model states and activations (estimates, see bench/memory.py).
GPU_PROCESS_BYTES = 1 * GiB  # CUDA context, NCCL buffers, caching-allocator slack
# A Ray Train worker with torch, transformers, DeepSpeed, peft, datasets and Ray imported is
# 516 MiB RSS (measured); its gloo group, thread pools and allocator arenas add the rest.
HOST_PROCESS_BYTES = int(0.6 * GiB)
# DeepSpeed's stage3_max_reuse_distance (its default; the trainer does not set it): a parameter
# gathered for the forward stays until the backward when it is reused within this many elements.
STAGE3_REUSE_ELEMENTS = 10**9
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class ModelShape:
    """A model's size, from its config."""

    name: str
    params: int
    largest_layer: int
    hidden: int
    layers: int
    vocab: int
    source: str
    """Where the config came from."""


@dataclass(frozen=True)
class Held:
    """One model a stage holds: trained (with how many trainable parameters) or frozen."""

    role: str
    shape: ModelShape
    trainable: int = 0
    """Trainable parameters (all for full fine-tuning, the adapters' with LoRA); 0: frozen."""
    frozen: int = 0
    """Parameters held without gradients or optimizer state (a frozen model; LoRA's base)."""


@dataclass
class StagePlan:
    stage: str
    models: list[Held]
    gpu_bytes: int
    """Per GPU (per worker on CPU-only clusters, where it is host memory)."""
    host_bytes: int
    """Per worker pod (its `gpusPerWorker` ranks and what they offload)."""
    parts: dict[str, int] = field(default_factory=dict)
    """Per-GPU breakdown: model states, activations, overhead."""


# ---------------------------------------------------------------------- model shapes


def _config(uri: str, override: str | None):
    from transformers import AutoConfig

    from rlhf_trainer.models import locate

    if override:
        path = Path(override)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"--model-config: {override} is not a config.json or its directory.")
        data = json.loads(path.read_text())
        return AutoConfig.for_model(**data), f"--model-config {override}"
    local = Path(uri)
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(local), f"{uri}/config.json"
    if uri in KNOWN_CONFIGS:
        return AutoConfig.for_model(**KNOWN_CONFIGS[uri]), "rlhf plan's built-in table"
    try:
        return AutoConfig.from_pretrained(locate(uri, "spec.model.base")), "Hugging Face hub"
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{uri}: no config found offline ({type(exc).__name__}); pass --model-config "
            f"with its config.json (known without one: {', '.join(KNOWN_CONFIGS)})."
        ) from exc


def model_shape(uri: str, *, scalar_head: bool = False, override: str | None = None):
    """Parameters of `uri`'s architecture (a causal LM, or with `scalar_head` a one-output
    sequence classifier), counted on the meta device: no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config, source = _config(uri, override)
    if scalar_head and getattr(config, "num_labels", 1) != 1 and config.model_type == "gpt2":
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    largest = max(
        sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()
    )
    text = getattr(config, "text_config", None) or config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "dim", 0)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layers", 0)
    return ModelShape(
        uri,
        int(params),
        int(largest),
        int(hidden),
        int(layers),
        int(getattr(text, "vocab_size", 0)),
        source,
    )


# ---------------------------------------------------------------------- bytes


def lora_params(shape: ModelShape, rank: int, targets_per_layer: int = 2) -> int:
    """Adapter parameters: rank x (in + out) per adapted matrix; PEFT's defaults adapt about
    two hidden x hidden projections per layer (GPT-2's c_attn is hidden x 3·hidden)."""
    return shape.layers * targets_per_layer * rank * (shape.hidden + 2 * shape.hidden)


def optimizer_bytes_per_param(zero: int, width: int) -> int:
    """Bytes per trained parameter beside its weight and gradient, where DeepSpeed's estimators
    do not apply (ZeRO-0, and fp32 at any stage), before ZeRO shards them.

    Adam's two fp32 moments (8). ZeRO-0 in fp32 has no more: torch's AdamW steps the model's own
    weights. ZeRO-0 in 16-bit runs DeepSpeed's FP16_Optimizer (bf16 too): an fp32 master copy
    (4) and, each step, the gradients flattened into fp32 (4; fused_optimizer.py). ZeRO-1/2 keep
    an fp32 gradient partition and an fp32 master partition (4 + 4), the latter cloned even from
    fp32 weights (stage_1_and_2.py `single_partition_of_fp32_groups`); ZeRO-3 shares fp32
    weights as masters (stage3.py `fp32_partitioned_groups_flat`), so fp32 adds only the
    gradient partition.
    """
    if width == 4 and zero == 0:
        return 8
    if width == 4 and zero == 3:
        return 8 + 4
    return 8 + 4 + 4


def model_states(
    held: Held, parallelism: ParallelismSpec, ranks: int, per_pod: int
) -> tuple[int, int]:
    """(bytes per GPU, bytes per host pod) of one model's weights, gradients and optimizer."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    zero, offload, precision = parallelism.zero_stage, parallelism.offload, parallelism.precision
    width = BYTES[precision]
    nodes = max(ranks // per_pod, 1)
    frozen = held.frozen * width // (ranks if zero == 3 else 1)
    gpu = host = 0
    trainable = held.trainable
    if trainable:
        if precision == "fp32" or zero == 0:
            # weights + grads in `width`, fp32 Adam moments, and what DeepSpeed adds
            states = optimizer_bytes_per_param(zero, width) * trainable
            shard = ranks if zero >= 1 else 1
            grads = width * trainable // (ranks if zero >= 2 else 1)
            weights = width * trainable // (ranks if zero == 3 else 1)
            if offload == "none":
                gpu = weights + grads + states // shard
            else:
                gpu, host = weights + grads, states // shard * per_pod
        elif zero == 3:
            host, gpu, _ = estimate_zero3_model_states_mem_needs(
                trainable,
                held.shape.largest_layer if trainable == held.shape.params else 0,
                num_gpus_per_node=per_pod,
                num_nodes=nodes,
                cpu_offload=offload != "none",
                cpu_offload_params=offload == "parameters",
                zero_init=True,
                additional_buffer_factor=1.0,
            )
        else:
            host, gpu = estimate_zero2_model_states_mem_needs(
                trainable,
                num_gpus_per_node=per_pod,
                num_nodes=nodes,
                cpu_offload=offload != "none",
                additional_buffer_factor=1.0,
            )
            if offload == "none":
                host = 0  # the estimator's figure is an fp32 load; models load in `precision`
    if zero == 3 and offload == "parameters":
        host += frozen * per_pod
        frozen = 0
    return gpu + frozen, host


def zero3_gathered(
    held: list[Held], zero: int, width: int, generation_gather: int, *, on_gpu: bool
) -> int:
    """Full (gathered) parameters a ZeRO-3 worker holds besides its partitions; 0 below ZeRO-3.

    On a GPU, the most gathered at once: a trained model's forward keeps each layer it will reuse
    in the backward within `STAGE3_REUSE_ELEMENTS`, so up to that many elements are whole at the
    forward/backward turnaround; generation may gather the whole policy (`generation_gather`).
    On a CPU worker every model's full parameters stay in the process: glibc keeps the freed
    all-gather buffers in its heap for the next gather instead of returning them (measured on
    two gloo ranks: RSS +2.3 copies of a model's parameters with the default allocator, none
    with MALLOC_MMAP_THRESHOLD_=65536; bench/memory.py's ZeRO-3 rows).
    """
    if zero != 3:
        return 0
    if not on_gpu:
        return sum(model.shape.params for model in held) * width
    turnaround = max(
        (min(m.shape.params, STAGE3_REUSE_ELEMENTS) for m in held if m.trainable), default=0
    )
    return max(turnaround * width, generation_gather)


def activations(shape: ModelShape, batch: int, seq: int, width: int, checkpointing: bool) -> int:
    """One micro-batch's forward + backward: per layer s·b·h·34 bytes in 16-bit (Korthikanti
    et al. 2022, attention scores aside; 2·s·b·h with checkpointing), plus the logits in the
    model's width, their fp32 copy and log-softmax (3 x b·s·V·4 in fp32)."""
    per_layer = (2 if checkpointing else 34) * seq * batch * shape.hidden * width // 2
    logits = batch * seq * shape.vocab * (width + 8)
    return shape.layers * per_layer + logits


def kv_cache(shape: ModelShape, batch: int, seq: int, width: int) -> int:
    return 2 * shape.layers * batch * seq * shape.hidden * width


# ---------------------------------------------------------------------- stages


def _shapes(job: RLHFJob, override: str | None) -> dict[str, ModelShape]:
    spec = job.spec
    base = spec.model.base
    shapes = {"policy": model_shape(base, override=override)}
    shapes["scalar"] = model_shape(base, scalar_head=True, override=override)
    reward = spec.stages.reward.model
    shapes["reward"] = model_shape(reward, scalar_head=True) if reward else shapes["scalar"]
    return shapes


def plan_stages(job: RLHFJob, model_config: str | None = None) -> list[StagePlan]:
    """Every enabled stage's memory for `job` as written."""
    from rlhf_operator.api.spec import ranks as rank_count

    spec = job.spec
    shapes = _shapes(job, model_config)
    par = spec.parallelism
    width = BYTES[par.precision]
    ranks = rank_count(spec)
    gpus = spec.cluster.workers.gpus_per_worker
    per_pod = max(gpus, 1)
    ckpt = par.gradient_checkpointing
    plans: list[StagePlan] = []

    def stage_plan(stage: str, held: list[Held], act: int, generation_gather: int = 0):
        gpu = host = 0
        for model in held:
            g, h = model_states(model, par, ranks, per_pod)
            gpu, host = gpu + g, host + h
        gathered = zero3_gathered(held, par.zero_stage, width, generation_gather, on_gpu=gpus > 0)
        act += gathered
        # Each rank loads its models in `precision` on the host before DeepSpeed takes them
        # (ZeRO-3: rank 0 reads the checkpoint into the partitions); the largest is the peak.
        biggest = max(m.shape.params for m in held) * width
        load = biggest if par.zero_stage != 3 else biggest // ranks
        overhead = GPU_PROCESS_BYTES if spec.cluster.workers.gpus_per_worker else 0
        parts = {
            "model states": gpu,
            "activations": act - gathered,
            "gathered parameters": gathered,
            "overhead": overhead,
        }
        per_gpu = gpu + act + overhead
        host_total = host + per_pod * (HOST_PROCESS_BYTES + load)
        if not spec.cluster.workers.gpus_per_worker:  # CPU: everything is host memory
            per_gpu = gpu + act + HOST_PROCESS_BYTES
            parts["overhead"] = HOST_PROCESS_BYTES
            host_total = host + per_gpu
        return StagePlan(stage, held, per_gpu, host_total, parts)

    def full(role: str, shape: ModelShape) -> Held:
        return Held(role, shape, trainable=shape.params)

    def frozen(role: str, shape: ModelShape) -> Held:
        return Held(role, shape, frozen=shape.params)

    stages = spec.stages
    if stages.sft.enabled:
        micro = stages.sft.micro_batch_size or max(stages.sft.batch_size // ranks, 1)
        act = activations(shapes["policy"], micro, stages.sft.max_seq_len, width, ckpt)
        plans.append(stage_plan("sft", [full("policy", shapes["policy"])], act))
    if stages.reward.enabled and not stages.reward.model:
        micro = stages.reward.micro_batch_size or max(stages.reward.batch_size // ranks, 1)
        shape = replace(shapes["scalar"], vocab=1)  # one output: no logits over a vocabulary
        act = activations(shape, 2 * micro, stages.reward.max_seq_len, width, ckpt)
        plans.append(stage_plan("reward", [full("reward model", shapes["scalar"])], act))
    if stages.ppo.enabled:
        ppo = stages.ppo
        # Responses per worker and iteration: a prompt's group of samples stays on one worker.
        shard = ppo.rollout_batch_size // ranks * ppo.samples_per_prompt
        micro = min(ppo.mini_batch_size or shard, shard)
        rollout = min(ppo.rollout_micro_batch_size or shard, shard)
        seq = ppo.max_prompt_len + ppo.generation.max_new_tokens
        policy, value = shapes["policy"], shapes["scalar"]
        if par.lora:
            adapters = lora_params(policy, par.lora.rank)
            held = [Held("policy (LoRA) + reference", policy, adapters, policy.params)]
            if ppo.has_critic:
                lora_value = lora_params(value, par.lora.rank)
                held.append(Held("value (LoRA)", value, lora_value, value.params))
        else:
            held = [full("policy", policy)]
            if ppo.has_critic:
                held.append(full("value", value))
            held.append(frozen("reference", policy))
        held.append(frozen("reward model", shapes["reward"]))
        train = activations(policy, micro, seq, width, ckpt)
        if ppo.has_critic:  # critic-free algorithms build no value model at all
            train += activations(replace(value, vocab=1), micro, seq, width, ckpt)
        generate = kv_cache(policy, rollout, seq, width) + rollout * policy.vocab * 4 * 3
        score = rollout * seq * policy.vocab * (width + 8)
        gather = policy.params * width  # ZeRO-3: the whole policy, once per rollout
        plans.append(stage_plan("ppo", held, max(train, generate, score), gather))
    if stages.enabled("dpo"):
        dpo = stages.dpo
        micro = dpo.micro_batch_size or max(dpo.batch_size // ranks, 1)
        policy = shapes["policy"]
        held = [full("policy", policy), frozen("reference", policy)]
        # chosen and rejected in one pass, through the policy (kept for the backward) and the
        # frozen reference (forward only, its activations freed at once)
        act = activations(policy, 2 * micro, dpo.max_seq_len, width, ckpt)
        plans.append(stage_plan("dpo", held, act))
    if stages.evaluation.enabled:
        policy = shapes["policy"]
        held = [
            frozen("sft", policy),
            frozen("rlhf", policy),
            frozen("reward model", shapes["reward"]),
        ]
        seq = (
            stages.ppo.max_prompt_len
            + (stages.evaluation.generation or stages.ppo.generation).max_new_tokens
        )
        batch = 8 * stages.evaluation.samples_per_prompt  # evaluation.PROMPTS_PER_PASS
        act = kv_cache(policy, batch, seq, width)
        plans.append(stage_plan("evaluation", held, act))
    return plans


# ---------------------------------------------------------------------- fit and advice


def parse_bytes(text: str) -> int:
    """80GiB, 80G, 40GB, 24Gi, 81920Mi -> bytes (GB and G taken as GiB, as GPU specs mean)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-memory: {text!r} is not a size; write e.g. 80GiB or 40GB.")
    unit = {"": 1, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}[match.group(2).upper()]
    return int(float(match.group(1)) * unit)


def gpu_memory_from_spec(job: RLHFJob) -> int | None:
    """The GPU's memory named in the workers' `nvidia.com/gpu.product` node selector
    (NVIDIA-A100-SXM4-80GB -> 80 GiB), else None."""
    product = job.spec.cluster.workers.node_selector.get("nvidia.com/gpu.product", "")
    match = re.search(r"(\d+)GB", product)
    return int(match.group(1)) * GiB if match else None


def host_memory_from_spec(job: RLHFJob) -> int | None:
    from kubernetes.utils import parse_quantity

    limits = job.spec.cluster.workers.resources.limits
    requests = job.spec.cluster.workers.resources.requests
    value = limits.get("memory") or requests.get("memory")
    return int(parse_quantity(str(value))) if value else None


def _fits(plan: StagePlan, gpu: int | None, host: int | None) -> bool:
    return (gpu is None or plan.gpu_bytes <= gpu) and (host is None or plan.host_bytes <= host)


CHANGES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("gradientCheckpointing: true", {"gradient_checkpointing": True}),
    ("zeroStage: 3", {"zero_stage": 3}),
    ("zeroStage: 3, offload: optimizer", {"zero_stage": 3, "offload": "optimizer"}),
    ("zeroStage: 3, offload: parameters", {"zero_stage": 3, "offload": "parameters"}),
    ("lora: {rank: 16}", {"lora": {"rank": 16}}),
    ("lora: {rank: 16}, zeroStage: 3", {"lora": {"rank": 16}, "zero_stage": 3}),
)


def advice(
    job: RLHFJob, stage: str, gpu: int | None, host: int | None, model_config: str | None
) -> str | None:
    """The first spec.parallelism change (or micro-batch) that makes `stage` fit, if any."""
    from rlhf_operator.api import RLHFJob as Job

    ppo = job.spec.stages.ppo
    candidates: list[tuple[str, dict[str, Any]]] = []
    if stage == "ppo":
        candidates.append(
            (
                "spec.stages.ppo.rolloutMicroBatchSize: 4",
                {"stages": {"ppo": {"rolloutMicroBatchSize": 4}}},
            )
        )
        if (ppo.mini_batch_size or 0) != 1:
            candidates.append(
                ("spec.stages.ppo.miniBatchSize: 1", {"stages": {"ppo": {"miniBatchSize": 1}}})
            )
    candidates += [
        (f"spec.parallelism.{text}", {"parallelism": change}) for text, change in CHANGES
    ]
    wire = job.model_dump(mode="json", by_alias=True, exclude={"status"})
    for text, patch in candidates:
        trial = json.loads(json.dumps(wire))
        for section, values in patch.items():
            target = trial["spec"].setdefault(section, {})
            if section == "stages":
                for name, fields in values.items():
                    target.setdefault(name, {}).update(fields)
            else:
                target.update(_camel(values))
        try:
            changed = Job.model_validate(trial)
        except ValueError:
            continue
        for plan in plan_stages(changed, model_config):
            if plan.stage == stage and _fits(plan, gpu, host):
                return text
    return None


def _camel(values: dict[str, Any]) -> dict[str, Any]:
    return {re.sub(r"_(\w)", lambda m: m.group(1).upper(), k): v for k, v in values.items()}


def _gib(value: int) -> str:
    return f"{value / GiB:.1f} GiB"


def report(
    job: RLHFJob, gpu_memory: str | None = None, model_config: str | None = None
) -> tuple[int, str]:
    """(exit code, text): 0 when every stage fits (or no limit is known), 3 when one does not."""
    from rlhf_operator.api.spec import ranks as rank_count

    spec = job.spec
    par = spec.parallelism
    gpu = parse_bytes(gpu_memory) if gpu_memory else gpu_memory_from_spec(job)
    host = host_memory_from_spec(job)
    gpus = spec.cluster.workers.gpus_per_worker
    plans = plan_stages(job, model_config)
    shapes = _shapes(job, model_config)
    shown = [shapes["policy"]] + ([shapes["reward"]] if spec.stages.reward.model else [])
    pods = f"{spec.cluster.workers.replicas} pods x {max(gpus, 1)}"
    lines = [
        f"rlhf plan: job {job.metadata.name}: {rank_count(spec)} ranks "
        f"({pods} {'GPU' if gpus else 'CPU worker'}), "
        f"ZeRO-{par.zero_stage}, offload {par.offload}, {par.precision}"
        + (f", LoRA rank {par.lora.rank}" if par.lora else "")
        + (", gradient checkpointing" if par.gradient_checkpointing else ""),
    ]
    for shape in shown:
        lines.append(
            f"  model {shape.name}: {shape.params / 1e6:,.1f}M parameters (config: {shape.source})"
        )
    per_gpu = "per GPU" if gpus else "per worker"
    limit = f" of {_gib(gpu)}" if gpu and gpus else ""
    host_head = "per host" + (f" of {_gib(host)}" if host else "")
    lines.append(f"  {'stage':<11}{per_gpu + limit:>22}{host_head:>24}  holds")
    code = 0
    for plan in plans:
        verdict = "" if _fits(plan, gpu if gpus else None, host) else "  DOES NOT FIT"
        holds = ", ".join(h.role for h in plan.models)
        gpu_text, host_text = _gib(plan.gpu_bytes), _gib(plan.host_bytes)
        lines.append(f"  {plan.stage:<11}{gpu_text:>22}{host_text:>24}  {holds}{verdict}")
        if verdict:
            code = 3
            fix = advice(job, plan.stage, gpu if gpus else None, host, model_config)
            lines.append(
                f"    -> {plan.stage} fits with {fix}"
                if fix
                else f"    -> {plan.stage}: no single setting makes it fit; add GPUs (replicas) or "
                "use larger ones"
            )
    if gpus and gpu is None:
        lines.append(
            "  GPU memory unknown: pass --gpu-memory 80GiB (or set the workers' nodeSelector "
            "nvidia.com/gpu.product) to check the fit."
        )
    lines.append(
        "  (estimates: DeepSpeed's model-state estimators + one micro-batch's activations + "
        "per-process overhead; bench/memory.py compares them with measurements)"
    )
    return code, "\n".join(lines)
