"""The evaluation's independent judge (`spec.stages.evaluation.judge`): a second scorer of both
policies' samples, other than the reward model PPO optimised. When the policy won only by the
reward model's measure, it learned the reward model's blind spots (reward hacking); a win by the
judge too means the task itself got better.

Two kinds:
  model     a sequence classifier or reward model (id or path), e.g. a sentiment classifier for
            IMDB. Read like a pretrained reward model (reward_model.py): the positive label's
            logit, through its own tokenizer when its vocabulary differs from the policy's.
  lexicon   a JSON file {word: weight}; a text's score is the sum of the weights of its
            whitespace-separated words. A rule, not a model: right for tasks whose true score is
            known. The tiny example's is its true sentiment count (make_tiny.py writes it: +1
            per positive adjective, -1 per negative one; every clause has exactly one).
Both score `prompt + response` as the policy saw it (the prompt after truncation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_trainer.jobspec import UserError

if TYPE_CHECKING:
    from rlhf_operator.api.spec import JudgeSpec

FIELD = "spec.stages.evaluation.judge"


def read_lexicon(uri: str, field: str = f"{FIELD}.lexicon") -> dict[str, float]:
    """The word weights of a lexicon file (local, pvc:// or object store)."""
    from rlhf_trainer.artifacts import read_text

    try:
        text = read_text(uri)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field}: could not read {uri}: {type(exc).__name__}: {exc}") from exc
    if text is None:
        raise UserError(f"{field}: {uri} does not exist; fix the path.")
    try:
        weights = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{field}: {uri} is not JSON ({exc}); write {{word: weight}}.") from exc
    if not isinstance(weights, dict) or not weights:
        raise UserError(f"{field}: {uri} must be a non-empty JSON object {{word: weight}}.")
    bad = [w for w, v in weights.items() if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise UserError(f"{field}: {uri}: the weight of {bad[0]!r} is not a number; fix it.")
    return {str(word): float(weight) for word, weight in weights.items()}


@dataclass(frozen=True)
class LexiconJudge:
    """Sum of word weights over the whitespace-separated words of a text."""

    weights: Mapping[str, float]

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        return [sum(self.weights.get(word, 0.0) for word in text.split()) for text in texts]


def check(spec: JudgeSpec | None) -> None:
    """Preflight: the lexicon parses; a local judge model exists and has the label asked for."""
    if spec is None:
        return
    if spec.lexicon:
        read_lexicon(spec.lexicon)
        return
    from rlhf_trainer.models import check_model_path

    check_model_path(spec.model, f"{FIELD}.model")
    _check_label(spec)


def _label_error(exc: UserError) -> UserError:
    """The reward model's label rule, reported against the judge's field."""
    return UserError(str(exc).replace("spec.stages.reward.positiveLabel", f"{FIELD}.positiveLabel"))


def _check_label(spec: JudgeSpec) -> None:
    from rlhf_operator.api.storage import local_path

    from rlhf_trainer.data import looks_local
    from rlhf_trainer.jobspec import is_remote
    from rlhf_trainer.reward_model import positive_label_index

    if is_remote(spec.model) or not looks_local(spec.model):
        return
    directory = Path(local_path(spec.model))
    if not (directory / "config.json").is_file():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    try:
        positive_label_index(config.id2label, spec.positive_label, spec.model)
    except UserError as exc:
        raise _label_error(exc) from None


def load_model(spec: JudgeSpec) -> Any:
    """The judge model as a RewardHead (its positive label's logit per sequence)."""
    from rlhf_trainer.reward_model import load_reward_head

    try:
        return load_reward_head(spec.model, f"{FIELD}.model", spec.positive_label)
    except UserError as exc:
        raise _label_error(exc) from None
