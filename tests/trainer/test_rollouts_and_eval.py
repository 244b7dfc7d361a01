"""Rollouts a real model would get right, and an evaluation that cannot flatter the policy:
prompt truncation keeps the opening, generation pads on the left whatever the tokenizer says,
responses cut at maxNewTokens pay missingEosPenalty, spec.model.revision/tokenizer reach every
stage, evaluation prompts are a seeded sample, and the independent judge scores beside the reward
model. On the tiny model and tokenizer, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rlhf_operator.api.spec import GenerationSpec, JudgeSpec
from rlhf_trainer.batches import prompt_ids
from rlhf_trainer.generation import pack, sample
from rlhf_trainer.jobspec import UserError, parse_job
from rlhf_trainer.stages.evaluation import summarize
from rlhf_trainer.stages.ppo import eos_penalised
from rlhf_trainer.summary import build_summary, stage_line
from tiny_jobs import tiny_manifest

EOS = 2


def tokenizer_of(tiny_dir: Path):
    from rlhf_trainer.models import load_tokenizer

    return load_tokenizer(str(tiny_dir / "model"), "spec.model.base")


# ---------------------------------------------------------------------- prompts


def test_a_long_prompt_keeps_its_opening_by_default_or_its_end_when_asked(tiny_dir) -> None:
    tokenizer = tokenizer_of(tiny_dir)
    text = "i watched the golden river and the plot was superb ."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert prompt_ids(tokenizer, [text], 4) == [ids[:4]]  # "right": the review's opening
    assert tokenizer.decode(prompt_ids(tokenizer, [text], 4)[0]) == "i watched the golden"
    assert prompt_ids(tokenizer, [text], 4, "left") == [ids[-4:]]
    assert prompt_ids(tokenizer, [text], 100) == [ids]


def test_the_prompts_spec_defaults_to_keeping_the_opening(tiny_dir, tmp_path) -> None:
    job = parse_job(tiny_manifest(tiny_dir, tmp_path))
    assert job.spec.stages.ppo.prompts.truncation_side == "right"


def test_generation_pads_prompts_on_the_left_whatever_the_tokenizer_was_saved_with(
    tiny_dir, tmp_path
) -> None:
    """A batch of prompts of different lengths generates what each prompt generates alone: the
    next token follows the last prompt token, not padding (a right-padded batch would not)."""
    from rlhf_trainer.models import load_causal_lm, load_tokenizer

    saved = tokenizer_of(tiny_dir)
    saved.padding_side = "right"  # as many tokenizers ship (GPT-2's does)
    saved.save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"), "spec.model.tokenizer")
    assert tokenizer.padding_side == "left"
    model = load_causal_lm(str(tiny_dir / "model"), "spec.model.base").eval()
    greedy = GenerationSpec(max_new_tokens=6, top_k=1)  # top-1 sampling: deterministic
    prompts = prompt_ids(tokenizer, ["about the silent river :", "i watched the"], 16)
    assert len(prompts[0]) != len(prompts[1])
    batched = sample(model, tokenizer, prompts, greedy, synced_gpus=False, device="cpu")
    for row, prompt in enumerate(prompts):
        alone = sample(model, tokenizer, [prompt], greedy, synced_gpus=False, device="cpu")
        assert batched.responses[row] == alone.responses[0]


# ---------------------------------------------------------------------- missing EOS


def test_missing_eos_penalty_hits_only_responses_cut_at_max_new_tokens() -> None:
    samples = pack([[5, 6], [5], [7, 8, 9]], [[10, 11, EOS], [10, 11, 12], []], pad_id=0)
    scores = torch.tensor([1.0, 1.0, 1.0])
    penalised = eos_penalised(scores, samples, EOS, 2.5)
    assert penalised.tolist() == [1.0, -1.5, -1.5]  # an empty response never emitted EOS either
    assert eos_penalised(scores, samples, EOS, None) is scores  # TRL's default: no penalty


def test_missing_eos_penalty_is_a_non_negative_number(tiny_dir, tmp_path) -> None:
    manifest = tiny_manifest(tiny_dir, tmp_path, ppo={"missingEosPenalty": -1})
    with pytest.raises(UserError, match=r"spec\.stages\.ppo\.missingEosPenalty"):
        parse_job(manifest)
    job = parse_job(tiny_manifest(tiny_dir, tmp_path, ppo={"missingEosPenalty": 1.0}))
    assert job.spec.stages.ppo.missing_eos_penalty == 1.0


# ---------------------------------------------------------------------- revision, tokenizer


def test_revision_and_tokenizer_follow_the_base_model_into_every_stage(tiny_dir, tmp_path):
    """With SFT off, reward, PPO and evaluation load spec.model.base itself: its revision and
    spec.model.tokenizer apply there; a stage's saved model has its own tokenizer, no revision."""
    from rlhf_trainer.models import model_revision, policy_source, tokenizer_source

    manifest = tiny_manifest(tiny_dir, tmp_path)
    manifest["spec"]["model"] |= {"revision": "v1.0", "tokenizer": "org/tokenizer"}
    with_sft = parse_job(manifest)
    manifest["spec"]["stages"]["sft"]["enabled"] = False
    without_sft = parse_job(manifest)

    base = str(tiny_dir / "model")
    uri, field = policy_source(without_sft)
    assert (uri, field) == (base, "spec.model.base")
    assert model_revision(without_sft, uri) == "v1.0"
    assert tokenizer_source(without_sft, uri, field) == (
        "org/tokenizer",
        "spec.model.tokenizer",
        None,
    )
    uri, field = policy_source(with_sft)  # the SFT artifact: its own tokenizer, no hub revision
    assert model_revision(with_sft, uri) is None
    assert tokenizer_source(with_sft, uri, field) == (uri, field, None)
    manifest["spec"]["model"].pop("tokenizer")
    no_tokenizer = parse_job(manifest)
    assert tokenizer_source(no_tokenizer, base, "spec.model.base") == (
        base,
        "spec.model.base",
        "v1.0",
    )


def test_a_revision_reaches_from_pretrained_in_a_stage_that_loads_the_base(
    tiny_dir, tmp_path, monkeypatch
) -> None:
    """Two revisions of one hub model in an offline hub cache: the reward stage's loader (SFT
    off) reads the one spec.model.revision names."""
    import huggingface_hub.constants as hub
    from rlhf_trainer.models import load_scalar_model, model_revision
    from transformers import AutoConfig

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    for commit, layers in (("a" * 40, 2), ("b" * 40, 1)):
        snapshot = repo / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for path in (tiny_dir / "model").iterdir():
            (snapshot / path.name).write_bytes(path.read_bytes())
        config = json.loads((snapshot / "config.json").read_text())
        config["n_layer"] = layers
        (snapshot / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v1.0").write_text("b" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    manifest = tiny_manifest(tiny_dir, tmp_path)
    manifest["spec"]["model"] = {"base": "org/tiny", "revision": "v1.0"}
    manifest["spec"]["stages"]["sft"]["enabled"] = False
    job = parse_job(manifest)
    revision = model_revision(job, "org/tiny")
    assert AutoConfig.from_pretrained("org/tiny", cache_dir=cache).n_layer == 2  # main
    model = load_scalar_model("org/tiny", "spec.model.base", 0, revision)
    assert model.model.config.n_layer == 1


# ---------------------------------------------------------------------- evaluation


def test_evaluation_prompts_are_a_seeded_sample_not_the_first_rows() -> None:
    """IMDB's test split is sorted by label: its first 64 rows are all negative."""
    import datasets
    from rlhf_trainer.data import sample_rows

    rows = datasets.Dataset.from_list(
        [{"text": f"review {i}", "label": int(i >= 500)} for i in range(1000)]
    )
    picked = sample_rows(rows, 64, seed=42)
    assert len(picked) == 64 and len(set(picked["text"])) == 64
    assert 20 <= sum(picked["label"]) <= 44  # both classes, about half each
    assert picked["text"] == sample_rows(rows, 64, seed=42)["text"]  # deterministic
    assert picked["text"] != sample_rows(rows, 64, seed=7)["text"]
    assert len(sample_rows(rows, 5000, seed=42)) == 1000


def test_the_judge_scores_beside_the_reward_model_and_shows_reward_hacking() -> None:
    """The reward model says PPO won everything; the true score says it got worse."""
    results = [
        {
            "sft_rewards": [0.0, 0.0],
            "rlhf_rewards": [5.0, 5.0],
            "sft_judge": [2.0, 1.0],
            "rlhf_judge": [-1.0, 1.0],
        }
    ] * 4
    metrics = summarize(results)
    assert metrics["win_rate"] == 1.0 and metrics["prompts_improved_fraction"] == 1.0
    assert metrics["judge_win_rate"] == 0.0  # a tie (1.0 vs 1.0) is no win
    assert metrics["judge_prompts_improved_fraction"] == 0.0
    assert (metrics["judge_mean_sft"], metrics["judge_mean_rlhf"]) == (1.5, 0.0)
    assert "judge_win_rate" not in summarize([{"sft_rewards": [0.0], "rlhf_rewards": [1.0]}])


def test_summary_and_printed_line_put_the_judge_beside_the_reward_model() -> None:
    from rlhf_trainer.launcher import StageResult

    metrics = {
        "win_rate": 0.9,
        "mean_reward_sft": 0.0,
        "mean_reward_rlhf": 1.0,
        "prompts_improved_fraction": 1.0,
        "judge_win_rate": 0.85,
        "judge_mean_sft": 0.5,
        "judge_mean_rlhf": 3.5,
        "judge_prompts_improved_fraction": 0.95,
    }
    result = StageResult("evaluation", "d", metrics, steps_run=2)
    summary = build_summary("job", 1.0, {"evaluation": result}, judge="true sentiment count")
    assert summary["stages"]["evaluation"] == {"judge": "true sentiment count", **metrics}
    line = stage_line(result)
    assert "win rate 0.900" in line
    assert "by the judge: win rate 0.850, prompts improved 0.950, mean SFT 0.500 → RLHF 3.500" in (
        line
    )


def test_the_lexicon_judge_is_the_tiny_tasks_true_sentiment_count(tiny_dir) -> None:
    from rlhf_trainer.judge import LexiconJudge, read_lexicon

    judge = LexiconJudge(read_lexicon(str(tiny_dir / "judge_lexicon.json")))
    assert judge.score_texts(
        [
            "i watched the golden river and the plot was superb . the music felt dull .",
            "about the silent city : the acting seemed great . the cast was moving .",
            "my review of the lost garden :",
        ]
    ) == [0.0, 2.0, 0.0]


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("not json", "is not JSON"),
        ("[1, 2]", "must be a non-empty JSON object"),
        ('{"good": "1"}', "the weight of 'good' is not a number"),
    ],
)
def test_a_bad_lexicon_names_the_field(tmp_path, content: str, text: str) -> None:
    from rlhf_trainer.judge import check

    path = tmp_path / "lexicon.json"
    path.write_text(content)
    with pytest.raises(UserError, match=r"^spec\.stages\.evaluation\.judge\.lexicon: ") as error:
        check(JudgeSpec(lexicon=str(path)))
    assert text in str(error.value)


def test_a_judge_model_scores_text_through_its_own_tokenizer(tiny_dir, tmp_path) -> None:
    """A classifier judge with another vocabulary (the test's tiny DistilBERT-like classifier):
    the policy's sequences are decoded and re-read with the judge's tokenizer."""
    from rlhf_trainer.judge import load_model
    from rlhf_trainer.reward_model import RewardScorer, load_reward_tokenizer
    from tiny_classifier import make_classifier

    classifier = make_classifier(tmp_path / "judge")
    spec = JudgeSpec(model=str(classifier), positive_label="POSITIVE")
    head = load_model(spec).eval()
    policy_tokenizer = tokenizer_of(tiny_dir)
    own = load_reward_tokenizer(spec.model, "spec.stages.evaluation.judge.model", policy_tokenizer)
    assert own is not None
    score = RewardScorer(head, policy_tokenizer, own, 64)
    ids = torch.tensor([policy_tokenizer("the plot was great .").input_ids])
    with torch.no_grad():
        value = score(ids, torch.ones_like(ids))
    assert value.shape == (1,) and torch.isfinite(value).all()
    with pytest.raises(UserError, match=r"^spec\.stages\.evaluation\.judge\.positiveLabel: "):
        load_model(JudgeSpec(model=str(classifier), positive_label="NEUTRAL"))


def test_fewer_evaluation_prompts_than_workers_names_num_prompts(tiny_dir, tmp_path) -> None:
    from rlhf_trainer.stages.evaluation import preflight

    job = parse_job(tiny_manifest(tiny_dir, tmp_path, evaluation={"numPrompts": 1}))
    with pytest.raises(UserError, match=r"^spec\.stages\.evaluation\.numPrompts \(1\) is below"):
        preflight(job, check_upstream=False)


def test_the_lexicon_judge_scores_sampled_sequences_as_the_true_count_of_their_responses(
    tiny_dir,
) -> None:
    """What the evaluation feeds the judge (prompt + response decoded from the sampled ids) scores
    what the response's words say: the openings carry no sentiment word."""
    from rlhf_trainer.generation import decode
    from rlhf_trainer.judge import LexiconJudge, read_lexicon
    from rlhf_trainer.models import load_causal_lm
    from rlhf_trainer.reward_model import decode_sequences
    from tiny_jobs import load_make_tiny

    make_tiny = load_make_tiny()
    tokenizer = tokenizer_of(tiny_dir)
    model = load_causal_lm(str(tiny_dir / "model"), "spec.model.base").eval()
    prompts = [json.loads(line)["prompt"] for line in (tiny_dir / "eval_prompts.jsonl").open()]
    torch.manual_seed(0)
    samples = sample(
        model,
        tokenizer,
        prompt_ids(tokenizer, prompts[:16], 16),
        GenerationSpec(max_new_tokens=20),
        synced_gpus=False,
        device="cpu",
    )
    judge = LexiconJudge(read_lexicon(str(tiny_dir / "judge_lexicon.json")))
    scores = judge.score_texts(
        decode_sequences(tokenizer, samples.input_ids, samples.attention_mask)
    )
    for score, response in zip(scores, samples.responses, strict=True):
        words = decode(tokenizer, response).split()
        true = sum(w in make_tiny.POSITIVE_WORDS for w in words)
        assert score == true - sum(w in make_tiny.NEGATIVE_WORDS for w in words)
    assert any(scores)  # the untrained model's random words include sentiment words
