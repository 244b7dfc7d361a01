"""Make the tiny local example: a synthetic movie-review task, its tokenizer and a tiny GPT-2.

The local analogue of the classic IMDB RLHF task (a GPT-2 policy steered towards positive reviews
by a sentiment reward model), small enough to train on two CPU cores in minutes and made here
with no download:

    examples/tiny/
      sft.jsonl             demonstrations: a review opening (prompt) and its continuation;
                            reviews lean positive or negative (half each), clause by clause
      preferences.jsonl     pairs of continuations of one opening (0-5 clauses): the one with
                            more positive than negative clauses is chosen (graded sentiment)
      prompts.jsonl         review openings for PPO rollouts (films seen in training)
      eval_prompts.jsonl    held-out openings (films never seen in any training file)
      judge_lexicon.json    the task's true score as a rule: +1 per positive adjective, -1 per
                            negative one (each clause has exactly one), i.e. the net sentiment
                            count the preferences were made from; the evaluation's independent
                            judge (spec.stages.evaluation.judge.lexicon), never seen by training
      model/                a word-level tokenizer trained on the corpus (`tokenizers`) and a
                            randomly initialised 2-layer GPT-2 from a config (`save_pretrained`)

Run from the repository root: `python examples/make_tiny.py [--out examples/tiny]`. Output is
deterministic for a given --seed; an existing directory is overwritten. Variants for tests:
`--heads 2` (vLLM's CPU attention), `--untied-head` (an output layer LoRA can adapt).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"

TITLE_ADJECTIVES = (
    *("silent", "red", "last", "hidden", "broken", "golden", "distant", "quiet"),
    *("lost", "frozen", "hollow", "bright", "northern", "secret", "wild"),
)
TITLE_NOUNS = ("river", "train", "garden", "city", "letter", "mirror", "harbor", "forest")
TITLE_NOUNS += ("island", "promise")
OPENERS = (
    "i watched the {title} and",
    "the {title} is a film where",
    "my review of the {title} :",
    "after seeing the {title} i think",
    "about the {title} :",
)
ASPECTS = ("acting", "plot", "story", "music", "ending", "cast", "script", "pacing", "dialogue")
ASPECTS += ("soundtrack",)
VERBS = ("was", "is", "felt", "seemed")
POSITIVE_WORDS = ("superb", "great", "wonderful", "brilliant", "moving", "excellent", "charming")
POSITIVE_WORDS += ("beautiful", "delightful", "clever")
NEGATIVE_WORDS = ("awful", "boring", "terrible", "dull", "weak", "poor", "messy", "bland")
NEGATIVE_WORDS += ("clumsy", "painful")

CLAUSES = 4  # clauses per demonstration
PAIR_CLAUSES = (0, 5)  # clauses per preference-pair continuation (inclusive range)
LEANINGS = (0.3, 0.7)  # per-review chance that a clause is positive: negative or positive review
HELD_OUT_TITLES = 30  # titles that appear only in eval_prompts.jsonl


def titles() -> list[str]:
    return [f"{adjective} {noun}" for adjective in TITLE_ADJECTIVES for noun in TITLE_NOUNS]


def prompt(rng: random.Random, title: str) -> str:
    return rng.choice(OPENERS).format(title=title)


def clause(rng: random.Random, positive: bool) -> str:
    adjective = rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    return f"the {rng.choice(ASPECTS)} {rng.choice(VERBS)} {adjective} ."


def continuation(rng: random.Random, positives: list[bool]) -> str:
    return " ".join(clause(rng, positive) for positive in positives)


def review(rng: random.Random) -> str:
    """A continuation of a positive- or negative-leaning review (mixed clause by clause)."""
    leaning = rng.choice(LEANINGS)
    return continuation(rng, [rng.random() < leaning for _ in range(CLAUSES)])


def with_positives(rng: random.Random, count: int, length: int) -> str:
    """A continuation of `length` clauses, exactly `count` of them positive (random positions)."""
    flags = [True] * count + [False] * (length - count)
    rng.shuffle(flags)
    return continuation(rng, flags)


def preference(rng: random.Random, title: str) -> dict[str, str]:
    """Two continuations of one opening, 0-5 clauses each: the one with the higher net sentiment
    (positive minus negative clauses) is chosen, as a sentiment classifier weighs evidence.

    Lengths vary independently of the preference and the empty continuation is neutral (net 0),
    so the reward model learns sentiment rather than length: PPO cannot win by stopping early.
    """
    while True:
        lengths = rng.randint(*PAIR_CLAUSES), rng.randint(*PAIR_CLAUSES)
        positives = [rng.randint(0, n) for n in lengths]
        nets = [2 * k - n for k, n in zip(positives, lengths, strict=True)]
        if nets[0] != nets[1]:
            break
    better, worse = sorted(range(2), key=lambda i: nets[i], reverse=True)
    return {
        "prompt": prompt(rng, title),
        "chosen": with_positives(rng, positives[better], lengths[better]),
        "rejected": with_positives(rng, positives[worse], lengths[worse]),
    }


def judge_lexicon() -> dict[str, int]:
    """The true score's word weights: the net sentiment count of a text is the sum over its
    words. No opening or title word carries a weight, so a prompt scores 0."""
    lexicon = {word: 1 for word in POSITIVE_WORDS} | {word: -1 for word in NEGATIVE_WORDS}
    neutral = {w for text in (*OPENERS, *TITLE_ADJECTIVES, *TITLE_NOUNS) for w in text.split()}
    assert not neutral & set(lexicon), "an opening word would carry sentiment"
    return lexicon


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def make_corpus(out: Path, rng: random.Random, sizes: dict[str, int]) -> list[str]:
    """Write the four data files; return every text (the tokenizer's training corpus)."""
    all_titles = titles()
    rng.shuffle(all_titles)
    held_out, seen = all_titles[:HELD_OUT_TITLES], all_titles[HELD_OUT_TITLES:]
    sft = [
        {"prompt": prompt(rng, rng.choice(seen)), "response": review(rng)}
        for _ in range(sizes["sft"])
    ]
    pairs = [preference(rng, rng.choice(seen)) for _ in range(sizes["preferences"])]
    prompts = [{"prompt": prompt(rng, rng.choice(seen))} for _ in range(sizes["prompts"])]
    eval_prompts = [
        {"prompt": prompt(rng, held_out[i % len(held_out)])} for i in range(sizes["eval"])
    ]
    write_jsonl(out / "sft.jsonl", sft)
    write_jsonl(out / "preferences.jsonl", pairs)
    write_jsonl(out / "prompts.jsonl", prompts)
    write_jsonl(out / "eval_prompts.jsonl", eval_prompts)
    (out / "judge_lexicon.json").write_text(json.dumps(judge_lexicon(), indent=1), "utf-8")
    rows = sft + pairs + prompts + eval_prompts
    return [text for row in rows for text in row.values()]


def make_tokenizer(corpus: list[str], out_dir: Path):
    """A word-level tokenizer trained on the corpus, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS]))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK, eos_token=EOS, bos_token=EOS
    )
    fast.save_pretrained(out_dir)
    return fast


def make_model(
    tokenizer, out_dir: Path, seed: int, heads: int = 4, untied_head: bool = False
) -> int:
    """A randomly initialised GPT-2-style model from a config; returns its parameter count.

    `heads`: attention heads over 64 dimensions; vLLM's CPU attention needs heads of at least 32
    dimensions (`--heads 2`, what the vLLM rollout tests use).
    `untied_head`: an output layer of its own instead of GPT-2's tied token embeddings (as GPT-J
    and Llama have), which LoRA can adapt (`--untied-head`, what the LoRA PPO test uses)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=heads,
        # No dropout: a tiny model on a small synthetic corpus does not overfit in a few hundred
        # steps, and PPO's ratios need the rollout and update passes to agree.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=not untied_head,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (2 for vLLM on CPU)")
    parser.add_argument(
        "--untied-head",
        action="store_true",
        help="an output layer of its own, not tied to the token embeddings (LoRA can adapt it)",
    )
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "model").mkdir(parents=True)
    rng = random.Random(args.seed)
    sizes = {"sft": 2000, "preferences": 2000, "prompts": 1024, "eval": 64}
    corpus = make_corpus(out, rng, sizes)
    tokenizer = make_tokenizer(corpus, out / "model")
    parameters = make_model(tokenizer, out / "model", args.seed, args.heads, args.untied_head)
    counts = ", ".join(f"{n} {name}" for name, n in sizes.items())
    print(
        f"tiny example in {out}: {counts}; vocabulary {len(tokenizer)} words; "
        f"GPT-2 with {parameters / 1e3:.0f}k parameters"
    )


if __name__ == "__main__":
    main()
