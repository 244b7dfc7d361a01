"""LoRA adapters (the `peft` library) for PPO's policy and value model (`spec.parallelism.lora`).

The policy is a `PeftModel` on the SFT model: only the adapters train, and the reference model
is the same module with its adapters off (`AdaptersOff`), so PPO holds one copy of the base
weights instead of two (OpenRLHF's and TRL's `ref_model=None` with a PEFT policy). The value
model gets adapters on its backbone and a fully trained scalar head. The policy is saved merged
(W + alpha/rank * B @ A) as a plain transformers model: evaluation and any later job load it
without `peft`. A module whose weight is tied to another (GPT-2's lm_head and token embeddings)
cannot take an adapter: merged, its update would land in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf_trainer.jobspec import UserError

if TYPE_CHECKING:
    from rlhf_operator.api.spec import LoraSpec

FIELD = "spec.parallelism.lora"


def lora_config(lora: LoraSpec, task_type: str | None):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        target_modules=list(lora.target_modules) or None,  # None: PEFT's per-architecture default
        lora_dropout=0.0,  # PPO compares log-probs of two passes (models.disable_dropout)
        bias="none",
        task_type=task_type,
    )


def _inject(model: torch.nn.Module, lora: LoraSpec, task_type: str | None, seed: int, field: str):
    from peft import get_peft_model

    # Every rank draws the same adapter init (ZeRO-3 partitions it without a broadcast).
    torch.manual_seed(seed)
    dtype = next(model.parameters()).dtype
    try:
        # PEFT would keep adapters in fp32 beside bf16 weights; ZeRO-3 flattens all trainable
        # parameters of an engine into one buffer of one dtype (DeepSpeed keeps fp32 masters).
        peft_model = get_peft_model(
            model, lora_config(lora, task_type), autocast_adapter_dtype=False
        )
    except ValueError as exc:
        raise UserError(
            f"{FIELD}.targetModules: {exc} (model {field}); name modules of this architecture "
            "(e.g. c_attn for GPT-2, q_proj/v_proj for Llama)."
        ) from exc
    _refuse_tied_targets(peft_model, field)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    return peft_model


def _refuse_tied_targets(peft_model: torch.nn.Module, field: str) -> None:
    """Refuse adapters on a module whose weight another module shares (tied embeddings): the
    adapted policy reads the old weight at one end and the new one at the other, but merged for
    saving the update lands in both, so the saved model would not be the trained one."""
    from peft.tuners.lora import LoraLayer

    names: dict[int, list[str]] = {}
    for name, param in peft_model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for module_name, module in peft_model.named_modules():
        weight = (
            getattr(module.get_base_layer(), "weight", None)
            if isinstance(module, LoraLayer)
            else None
        )
        if weight is not None and len(names.get(id(weight), ())) > 1:
            target = module_name.rsplit(".", 1)[-1]
            tied = ", ".join(n.removeprefix("base_model.model.") for n in names[id(weight)])
            raise UserError(
                f"{FIELD}.targetModules: {target} shares its weight with another module ({tied}; "
                f"tied embeddings of model {field}), so its merged adapter would change both; "
                f"drop {target} from targetModules (adapt the layers between them instead), or "
                "start from a copy of the model with its own output layer (tie_word_embeddings: "
                "false, the head copied from the embeddings) to adapt it."
            )


def add_policy_adapters(model: torch.nn.Module, lora: LoraSpec, seed: int, field: str):
    """The causal LM `model` as a `PeftModel`: only the adapters are trainable."""
    return _inject(model, lora, "CAUSAL_LM", seed, field)


def add_value_adapters(scalar_model: torch.nn.Module, lora: LoraSpec, seed: int, field: str):
    """Adapters on a `ScalarHeadModel`'s backbone (injected in place); its scalar head trains
    in full (a fresh head has nothing to adapt). No PEFT task type: SEQ_CLS would wrap the head
    in a trained copy beside the original (`modules_to_save`), two heads where one is used."""
    _inject(scalar_model.model, lora, None, seed, field)
    scalar_model.model.score.requires_grad_(True)
    return scalar_model


def is_peft(model: Any) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "merge_adapter")


def trainable_fraction(model: torch.nn.Module) -> float:
    """Trainable parameters / all parameters (under ZeRO-3: of the full shapes)."""

    def numel(p: torch.nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    total = sum(numel(p) for p in model.parameters())
    return sum(numel(p) for p in model.parameters() if p.requires_grad) / max(total, 1)


class AdaptersOff:
    """PPO's reference model: the policy engine's forward with the adapters disabled (the
    SFT model it started from, bit for bit)."""

    def __init__(self, policy_engine) -> None:
        self.engine = policy_engine

    def __call__(self, **inputs):
        with self.engine.module.disable_adapter():
            return self.engine(**inputs)

    @property
    def module(self):
        return self.engine.module


def save_merged(peft_model, out_dir: Path) -> None:
    """Save the base model with the adapters merged into its weights, as a plain transformers
    model (no `peft` needed to load it). The adapters are unmerged afterwards. Under ZeRO-3 the
    caller holds the gathered parameters."""
    peft_model.merge_adapter()
    try:
        base = peft_model.get_base_model()
        state = {
            key.replace(".base_layer.", "."): value
            for key, value in base.state_dict().items()
            if "lora_" not in key
        }
        base.save_pretrained(out_dir, state_dict=state)
    finally:
        peft_model.unmerge_adapter()
