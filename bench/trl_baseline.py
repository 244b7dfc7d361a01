"""The anchor side of bench/trainer_throughput.py: TRL's SFTTrainer and RewardTrainer on the
tiny example, with the settings of our stage (steps, batch, learning rate, max length, seed).

Each runner returns {"loop_s", "loop_cpu_s", "build_s", "total_s", "loss"}: `trainer.train()`
by TRL's own clock and by the CPU seconds of this thread (TRL's dataloader runs in it:
`dataloader_num_workers=0`), the trainer's construction (model load, tokenization), the whole
call, and TRL's mean training loss.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """TRL/transformers chatter (load reports, tokenizing bars) off the benchmark's output."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def common_args(steps: int, batch: int, stage: dict[str, Any], seed: int, out: Path):
    """TrainingArguments fields both trainers share: our stage's settings, no logging/saving."""
    return {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "learning_rate": stage["learningRate"],
        "lr_scheduler_type": "linear",
        "max_length": stage["maxSeqLen"],
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": seed,
    }


def _timed_train(build, out: Path) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)  # as a 1-CPU Ray worker (OMP_NUM_THREADS=1)
    started = time.perf_counter()
    with quiet():
        trainer = build()
        built = time.perf_counter()
        cpu_started = time.thread_time()
        output = trainer.train()
        cpu = time.thread_time() - cpu_started
        trainer.save_model(str(out / "model"))
    return {
        "loop_s": output.metrics["train_runtime"],
        "loop_cpu_s": cpu,
        "build_s": built - started,
        "total_s": time.perf_counter() - started,
        "loss": output.metrics["train_loss"],
    }


def trl_sft(
    tiny: Path, steps: int, batch: int, stage: dict[str, Any], seed: int, out: Path
) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(tiny / "sft.jsonl")
    # TRL joins prompt and completion as text; the space keeps the word-level tokens apart.
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": " " + r["response"]} for r in rows]
    )

    def build():
        return SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(tiny / "model")),
            args=SFTConfig(**common_args(steps, batch, stage, seed, out)),
            train_dataset=data,
            processing_class=AutoTokenizer.from_pretrained(str(tiny / "model")),
        )

    return _timed_train(build, out)


def trl_reward(
    tiny: Path, steps: int, batch: int, stage: dict[str, Any], seed: int, out: Path
) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    rows = read_jsonl(tiny / "preferences.jsonl")
    data = Dataset.from_list(
        [
            {"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            for r in rows
        ]
    )

    def build():
        tokenizer = AutoTokenizer.from_pretrained(str(tiny / "model"))
        model = AutoModelForSequenceClassification.from_pretrained(
            str(tiny / "model"), num_labels=1
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return RewardTrainer(
            model=model,
            args=RewardConfig(**common_args(steps, batch, stage, seed, out)),
            train_dataset=data,
            processing_class=tokenizer,
        )

    return _timed_train(build, out)
