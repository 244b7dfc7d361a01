"""Models of the pipeline: where each comes from, how it is loaded, and the scalar-head wrapper.

policy (SFT, PPO)        AutoModelForCausalLM
reward and value models  AutoModelForSequenceClassification(num_labels=1) on a causal-LM
                         backbone, read per token through `ScalarHeadModel`
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rlhf_operator.api.storage import local_path, looks_local

from rlhf_trainer.artifacts import MODEL_DIR, Artifact, fetch_dir
from rlhf_trainer.jobspec import UserError, is_remote

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob


def policy_source(job: RLHFJob) -> tuple[str, str]:
    """(uri, spec field) of the model PPO starts from and evaluation compares against: SFT's."""
    if job.spec.stages.sft.enabled:
        return stage_model_uri(job, "sft"), "spec.stages.sft (its model artifact)"
    return job.spec.model.base, "spec.model.base"


def reward_source(job: RLHFJob) -> tuple[str, str]:
    """(uri, spec field) of the reward model PPO and evaluation score with."""
    if job.spec.stages.reward.model:
        return job.spec.stages.reward.model, "spec.stages.reward.model"
    return stage_model_uri(job, "reward"), "spec.stages.reward (its model artifact)"


def model_revision(job: RLHFJob, uri: str) -> str | None:
    """spec.model.revision where spec.model.base itself is loaded (in any stage: SFT, a reward
    model or PPO policy started from the base when SFT is off); a stage's saved model has none."""
    return job.spec.model.revision if uri == job.spec.model.base else None


def tokenizer_source(job: RLHFJob, uri: str, field: str) -> tuple[str, str, str | None]:
    """(uri, field, revision) of the tokenizer that goes with the model at `uri`:
    spec.model.tokenizer for the base model when set (its own revision, none), else the model's
    own (a stage's artifact saves the tokenizer it was trained with)."""
    if uri == job.spec.model.base and job.spec.model.tokenizer:
        return job.spec.model.tokenizer, "spec.model.tokenizer", None
    return uri, field, model_revision(job, uri)


def tuned_source(job: RLHFJob) -> tuple[str, str]:
    """(uri, spec field) of the policy evaluation compares with SFT's: DPO's when DPO runs,
    else the RL stage's."""
    stage = "dpo" if job.spec.stages.enabled("dpo") else "ppo"
    return stage_model_uri(job, stage), f"spec.stages.{stage} (its model artifact)"


def stage_model_uri(job: RLHFJob, stage: str) -> str:
    return Artifact(job.spec.storage.uri, job.metadata.name, stage).uri_of(MODEL_DIR)


def check_model_path(uri: str, field: str) -> None:
    """Fail early, naming the field, when a local model path does not exist."""
    if not is_remote(uri) and looks_local(uri) and not Path(local_path(uri)).exists():
        raise UserError(
            f"{field}: model path {uri} does not exist; fix the path or use a model id."
        )


def locate(uri: str, field: str) -> str:
    """Something `from_pretrained` reads: a local directory (pvc:// mounted, s3:// fetched) or a
    Hugging Face id."""
    if is_remote(uri):
        return str(fetch_dir(uri))
    check_model_path(uri, field)
    return local_path(uri) if looks_local(uri) else uri


def _loading(field: str, uri: str, exc: Exception) -> UserError:
    return UserError(f"{field}: could not load {uri}: {type(exc).__name__}: {exc}")


def load_tokenizer(uri: str, field: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(locate(uri, field), revision=revision)
    except (OSError, ValueError) as exc:
        raise _loading(field, uri, exc) from exc
    if tokenizer.eos_token_id is None:
        raise UserError(f"{field}: the tokenizer of {uri} has no EOS token; set one and re-save.")
    if tokenizer.pad_token_id is None:  # GPT-2 has none; padding is masked out everywhere
        tokenizer.pad_token = tokenizer.eos_token
    # Decoder-only generation needs prompts padded on the left (the next token follows the last
    # prompt token). generation.py pads itself whatever the tokenizer says; this makes any
    # tokenizer-driven batching (`tokenizer(..., padding=True)`) agree with it.
    tokenizer.padding_side = "left"
    return tokenizer


def hidden_size(uri: str, field: str, revision: str | None = None) -> int | None:
    """The model's hidden size from its config alone (ZeRO-3's buckets are sized from it before
    the model is built); transformers' rule for DeepSpeed's "auto" values. None if it has none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(locate(uri, field), revision=revision)
    except (OSError, ValueError) as exc:
        raise _loading(field, uri, exc) from exc
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        if getattr(candidate, "hidden_size", None):
            return int(candidate.hidden_size)
        if getattr(candidate, "hidden_sizes", None):
            return int(max(candidate.hidden_sizes))
    return None


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_dtype(precision: str) -> torch.dtype:
    """The dtype models are loaded in: the spec's precision, so a worker never holds an fp32 copy
    DeepSpeed would only cast down (a 6B model: 12 GB in bf16 instead of 24 GB). DeepSpeed keeps
    the fp32 master weights of trained models in its optimizer, as OpenRLHF and DeepSpeed-Chat
    do when they load in bf16."""
    return PRECISION_DTYPES[precision]


def load_causal_lm(
    uri: str, field: str, revision: str | None = None, dtype: torch.dtype = torch.float32
):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            locate(uri, field), revision=revision, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise _loading(field, uri, exc) from exc


def load_scalar_model(
    uri: str,
    field: str,
    pad_token_id: int,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ScalarHeadModel:
    """A one-output sequence-classification model (a fresh head on a causal-LM backbone, or a
    saved reward model's own head)."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            locate(uri, field), revision=revision, num_labels=1, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise _loading(field, uri, exc) from exc
    model.config.pad_token_id = pad_token_id
    return ScalarHeadModel(model, field)


class ScalarHeadModel(torch.nn.Module):
    """Per-token scalar outputs `[B, T]` of a sequence-classification model.

    HF's `*ForSequenceClassification.forward` returns only the pooled score, found through
    `pad_token_id` (wrong when pad == EOS, as for GPT-2). PPO's value model needs every token's
    value, and scores must pool by attention mask, so the backbone and the `score` head (the name
    every decoder classification model in transformers uses) are called directly, as TRL's
    `get_reward` does. Being a module, it goes into DeepSpeed as a whole.
    """

    def __init__(self, model: torch.nn.Module, field: str = "model") -> None:
        super().__init__()
        if not isinstance(getattr(model, "score", None), torch.nn.Module):
            raise UserError(
                f"{field}: {type(model).__name__} has no `score` head; use a decoder model "
                "(GPT-2, Llama, Qwen, Mistral, ...) for reward and value models."
            )
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        return self.model.score(hidden).squeeze(-1).float()


def last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """`values[b, last attended position]` of right-padded sequences: the sequence's score."""
    last = attention_mask.long().sum(dim=-1).clamp_min(1) - 1
    return values.gather(1, last.unsqueeze(1)).squeeze(1)


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO compares log-probabilities of two passes; dropout would make them disagree (TRL)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(token t+1 | tokens <= t): `[B, T-1]`, in float32, of the distribution sampling used:
    logits divided by `temperature` (as OpenRLHF and TRL score), so PPO's ratios and the KL are
    on-policy for any temperature. Top-k/top-p are not applied: a token the old policy sampled
    may leave the new policy's top-k during an update (log-prob -inf, ratio 0 or NaN)."""
    logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of each next-token distribution `[B, T-1]` (same processing as `token_logprobs`)."""
    logprobs = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logprobs.exp() * logprobs).sum(-1)
