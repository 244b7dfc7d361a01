"""The reward model PPO and evaluation score with: the reward stage's own model, or a pretrained
sequence classifier (`spec.stages.reward.model`), e.g. lvwerra/distilbert-imdb, an encoder with
two labels (NEGATIVE/POSITIVE) and its own tokenizer.

A sequence's reward is the logit of the classifier's positive label (`positive_label_index`):
  spec.stages.reward.positiveLabel   the label of that name in the model's id2label
  one label                          its logit (the reward stage trains such models)
  two labels                         the label named positive (any case), else LABEL_1, else 1
  three labels or more               positiveLabel is required
Decoder classifiers with a per-token `score` head (ours; GPT-2, Llama, ... classifiers) are read
at the last attended token, where the reward stage trains them (EOS); any other classifier
(encoders: BERT, DistilBERT, RoBERTa) through its own forward, i.e. its pooled logits.

When the reward model's vocabulary is not the policy's, the policy's sequences are decoded to text
(prompt + response, as sampled) and re-tokenized with the reward model's tokenizer, as TRL's
sentiment example feeds `query + response` texts to its classifier pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import last_token, locate

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

logger = logging.getLogger("rlhf_trainer")

POSITIVE_LABEL_FIELD = "spec.stages.reward.positiveLabel"
POSITIVE_NAMES = ("positive", "label_1")  # in this order of preference, compared lower-cased
DEFAULT_POSITIVE_INDEX = 1


def positive_label_index(
    id2label: Mapping[int, str], positive_label: str | None, model: str
) -> int:
    """Index of the logit that is the reward (the rule in this module's docstring)."""
    labels = {int(index): str(name) for index, name in id2label.items()}
    listed = ", ".join(labels[i] for i in sorted(labels))
    if positive_label is not None:
        exact = [i for i, name in labels.items() if name == positive_label]
        folded = [i for i, name in labels.items() if name.lower() == positive_label.lower()]
        found = exact or folded
        if len(found) != 1:
            raise UserError(
                f"{POSITIVE_LABEL_FIELD}: {positive_label!r} is not a label of {model} (its "
                f"labels: {listed}); set it to one of them."
            )
        return found[0]
    if len(labels) == 1:
        return next(iter(labels))
    if len(labels) == 2:
        for wanted in POSITIVE_NAMES:
            for index, name in sorted(labels.items()):
                if name.lower() == wanted:
                    return index
        return DEFAULT_POSITIVE_INDEX
    raise UserError(
        f"{POSITIVE_LABEL_FIELD}: {model} has {len(labels)} labels ({listed}); set "
        f"{POSITIVE_LABEL_FIELD} to the one whose logit is the reward."
    )


class RewardHead(torch.nn.Module):
    """Sequence rewards `[B]` of a sequence-classification model: its positive label's logit.

    Being a module, it goes into DeepSpeed as a whole (a frozen engine).
    """

    def __init__(self, model: torch.nn.Module, label: int) -> None:
        super().__init__()
        self.model = model
        self.label = label
        self.per_token = isinstance(getattr(model, "score", None), torch.nn.Module)
        """A decoder's per-token head, read at the last attended token (see models.py's
        ScalarHeadModel for why not through HF's pooled forward)."""

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.per_token:
            hidden = self.model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            logits = self.model.score(hidden)[..., self.label].float()
            return last_token(logits, attention_mask)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, self.label].float()


def load_reward_head(
    uri: str, field: str, positive_label: str | None, dtype: torch.dtype = torch.float32
) -> RewardHead:
    """The classifier as saved (its own number of labels), wrapped to give sequence rewards."""
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(locate(uri, field), dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"{field}: could not load {uri}: {type(exc).__name__}: {exc}") from exc
    label = positive_label_index(model.config.id2label, positive_label, uri)
    return RewardHead(model, label)


def load_reward_tokenizer(uri: str, field: str, policy_tokenizer):
    """The reward model's own tokenizer, or None when it reads the policy's vocabulary (then the
    policy's token ids are scored as they are). A model saved without a tokenizer is read with
    the policy's, as before pretrained classifiers were supported."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(locate(uri, field))
    except (OSError, ValueError, TypeError):
        logger.warning("%s: no tokenizer saved with %s; reading it with the policy's", field, uri)
        return None
    if tokenizer.get_vocab() == policy_tokenizer.get_vocab():
        return None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(
                f"{field}: the tokenizer of {uri} has neither a padding nor an EOS token; set a "
                "pad_token and re-save it."
            )
        tokenizer.pad_token = tokenizer.eos_token
    # A cut keeps the end of the text (the response), where the reward is read.
    tokenizer.truncation_side = "left"
    return tokenizer


def value_init_problem(reward: RewardHead, own_tokenizer: bool, uri: str) -> str | None:
    """Why the value model cannot start from the reward model (None: it can).

    The value model reads the policy's tokens and needs one value per token: only a one-label
    decoder classifier on the policy's vocabulary (what the reward stage trains) qualifies.
    """
    kind = type(reward.model).__name__
    if own_tokenizer:
        return f"the reward model {uri} ({kind}) has its own tokenizer (another vocabulary)"
    if not reward.per_token:
        return f"the reward model {uri} ({kind}) has no per-token `score` head"
    if reward.num_labels != 1:
        return f"the reward model {uri} has {reward.num_labels} labels, a value model one output"
    return None


def max_length(tokenizer, model: torch.nn.Module) -> int | None:
    """Longest input the reward model reads: its tokenizer's limit and its position table's."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if tokenizer.model_max_length < 10**9:  # transformers' "no limit" is a huge number
        limits.append(tokenizer.model_max_length)
    limits = [int(limit) for limit in limits if limit]
    return min(limits) if limits else None


def decode_sequences(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """The text of each right-padded `prompt + response` (special tokens such as EOS dropped)."""
    lengths = attention_mask.long().sum(dim=1).tolist()
    rows = input_ids.tolist()
    return [
        tokenizer.decode(row[:length], skip_special_tokens=True).strip()
        for row, length in zip(rows, lengths, strict=True)
    ]


def retokenize(tokenizer, texts: Sequence[str], limit: int | None):
    """Right-padded ids and mask of `texts` in the reward model's tokenizer (with its special
    tokens, e.g. [CLS] ... [SEP]); an empty text becomes one padding token, attended."""
    from rlhf_trainer.batches import pad_right

    encoded = tokenizer(list(texts), truncation=limit is not None, max_length=limit)["input_ids"]
    sequences = [ids or [tokenizer.pad_token_id] for ids in encoded]
    return pad_right(sequences, tokenizer.pad_token_id)


@dataclass
class RewardScorer:
    """Rewards of the policy's sampled sequences, through the reward model's own tokenizer when
    its vocabulary differs."""

    engine: Any
    """The frozen DeepSpeed engine of a `RewardHead`."""
    policy_tokenizer: Any
    tokenizer: Any | None = None
    """The reward model's tokenizer; None when it reads the policy's token ids."""
    limit: int | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            return self.engine(input_ids=input_ids, attention_mask=attention_mask)
        texts = decode_sequences(self.policy_tokenizer, input_ids, attention_mask)
        ids, mask = retokenize(self.tokenizer, texts, self.limit)
        device = input_ids.device
        return self.engine(input_ids=ids.to(device), attention_mask=mask.to(device))


def check_positive_label(job: RLHFJob) -> None:
    """Preflight: a local pretrained classifier's labels against positiveLabel (before workers
    start; a hub model is checked when the workers load it)."""
    from pathlib import Path

    from rlhf_operator.api.storage import local_path, looks_local

    from rlhf_trainer.jobspec import is_remote

    reward = job.spec.stages.reward
    if not reward.model or is_remote(reward.model) or not looks_local(reward.model):
        return
    directory = Path(local_path(reward.model))
    if not (directory / "config.json").is_file():
        return
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    positive_label_index(config.id2label, reward.positive_label, reward.model)
