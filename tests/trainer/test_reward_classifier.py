"""Pretrained reward classifiers (spec.stages.reward.model), as in examples/imdb-sentiment.yaml
with lvwerra/distilbert-imdb: a two-label encoder with its own tokenizer. The reward is the
positive label's logit on the policy's text re-tokenized for the classifier, and PPO steers the
policy towards it. Stand-in: tiny_classifier.py's DistilBERT (made here, no download)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rlhf_trainer.batches import pad_right
from rlhf_trainer.jobspec import UserError, parse_job, with_absolute_paths
from rlhf_trainer.reward_model import (
    POSITIVE_LABEL_FIELD,
    RewardHead,
    RewardScorer,
    load_reward_head,
    load_reward_tokenizer,
    max_length,
    positive_label_index,
    value_init_problem,
)
from tiny_classifier import accuracy, make_classifier
from tiny_jobs import tiny_manifest


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_classifier(tmp_path_factory.mktemp("classifier"))
    assert accuracy(directory) > 0.95  # a sentiment classifier worth steering towards
    return directory


@pytest.mark.parametrize(
    ("id2label", "positive_label", "expected"),
    [
        ({0: "LABEL_0"}, None, 0),  # one output: the reward stage's own models
        ({0: "NEGATIVE", 1: "POSITIVE"}, None, 1),  # lvwerra/distilbert-imdb
        ({0: "positive", 1: "negative"}, None, 0),  # named, whatever its position
        ({0: "LABEL_0", 1: "LABEL_1"}, None, 1),
        ({0: "nothate", 1: "hate"}, None, 1),  # unnamed: label 1 ...
        ({0: "nothate", 1: "hate"}, "nothate", 0),  # ... unless the spec says otherwise
        ({0: "neg", 1: "neu", 2: "pos"}, "POS", 2),  # case-insensitive when not exact
    ],
)
def test_the_reward_is_the_positive_labels_logit(id2label, positive_label, expected) -> None:
    assert positive_label_index(id2label, positive_label, "m") == expected


def test_a_label_that_cannot_be_chosen_names_the_field() -> None:
    with pytest.raises(UserError, match=f"{POSITIVE_LABEL_FIELD}: m has 3 labels"):
        positive_label_index({0: "neg", 1: "neu", 2: "pos"}, None, "m")
    with pytest.raises(
        UserError, match=re.escape("'good' is not a label of m (its labels: NEG, POS)")
    ):
        positive_label_index({0: "NEG", 1: "POS"}, "good", "m")


def test_scores_go_through_the_classifiers_own_tokenizer(classifier: Path, tiny_dir) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    policy_tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    tokenizer = load_reward_tokenizer(str(classifier), "rm", policy_tokenizer)
    assert tokenizer is not None  # another vocabulary
    assert load_reward_tokenizer(str(tiny_dir / "model"), "rm", policy_tokenizer) is None
    head = load_reward_head(str(classifier), "spec.stages.reward.model", None).eval()
    assert head.label == 1 and not head.per_token
    problem = value_init_problem(head, True, "rm")
    assert problem is not None and "its own tokenizer" in problem

    texts = [
        ("i watched the red river and", "the acting was superb . the plot is great ."),
        ("about the quiet city :", "the ending felt awful . the music seemed dull ."),
    ]
    eos = policy_tokenizer.eos_token_id
    sequences = [
        policy_tokenizer(f"{p} {r}", add_special_tokens=False)["input_ids"] + [eos]
        for p, r in texts
    ]
    ids, mask = pad_right(sequences, policy_tokenizer.pad_token_id)
    scorer = RewardScorer(head, policy_tokenizer, tokenizer, max_length(tokenizer, head.model))
    with torch.no_grad():
        scores = scorer(ids, mask)
        reference = AutoModelForSequenceClassification.from_pretrained(classifier).eval()
        own = AutoTokenizer.from_pretrained(classifier)
        expected = reference(
            **own([f"{p} {r}" for p, r in texts], padding=True, return_tensors="pt")
        ).logits[:, reference.config.label2id["POSITIVE"]]
    torch.testing.assert_close(scores, expected)
    assert scores[0] > scores[1]  # the positive review scores higher


def test_the_value_model_starts_from_a_reward_model_of_the_policys_kind(tiny_dir) -> None:
    from transformers import GPT2ForSequenceClassification

    decoder = GPT2ForSequenceClassification.from_pretrained(tiny_dir / "model", num_labels=1)
    assert value_init_problem(RewardHead(decoder, 0), False, "rm") is None
    two = GPT2ForSequenceClassification.from_pretrained(tiny_dir / "model", num_labels=2)
    assert "2 labels" in value_init_problem(RewardHead(two, 1), False, "rm")


def test_preflight_rejects_a_label_the_classifier_does_not_have(
    classifier: Path, tiny_dir, tmp_path
) -> None:
    from rlhf_trainer.launcher import preflight

    manifest = pretrained_rm_job(tiny_dir, tiny_dir / "model", classifier, tmp_path)
    manifest["spec"]["stages"]["reward"]["positiveLabel"] = "happy"
    with pytest.raises(UserError, match=f"{POSITIVE_LABEL_FIELD}: 'happy' is not a label"):
        preflight(with_absolute_paths(parse_job(manifest)), "ppo")


def pretrained_rm_job(tiny_dir: Path, policy: Path, classifier: Path, storage: Path) -> dict:
    """The tiny job as examples/imdb-sentiment.yaml shapes it: no SFT or reward stage, the
    policy is the base model, the reward a pretrained classifier."""
    manifest = tiny_manifest(
        tiny_dir,
        storage,
        sft={"enabled": False},
        reward={"enabled": False, "model": str(classifier)},
        ppo={"steps": 12, "rolloutBatchSize": 32, "checkpointEverySteps": 100},
        evaluation={"numPrompts": 16, "samplesPerPrompt": 2},
    )
    manifest["spec"]["model"]["base"] = str(policy)
    return manifest


@pytest.mark.slow
def test_ppo_raises_a_pretrained_classifiers_reward(classifier: Path, tiny_run, tiny_dir, tmp_path):
    """PPO from the session's SFT policy against the two-label encoder classifier, then the
    evaluation scored by it (both read the policy's text through the classifier's tokenizer)."""
    from rlhf_trainer.launcher import run_stage

    policy = tiny_run.output / "tiny-reviews" / "sft" / "model"
    job = with_absolute_paths(parse_job(pretrained_rm_job(tiny_dir, policy, classifier, tmp_path)))

    ppo = run_stage(job, "ppo")
    rewards = [row["reward_mean"] for row in ppo.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.5, rewards
    evaluation = run_stage(job, "evaluation")
    assert evaluation.metrics["mean_reward_rlhf"] > evaluation.metrics["mean_reward_sft"]
    rows = (tmp_path / "tiny-reviews" / "evaluation" / "examples.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 * 2
    assert json.loads((tmp_path / "tiny-reviews" / "ppo" / "metrics.json").read_text())
