"""A local stand-in for lvwerra/distilbert-imdb: a tiny two-label DistilBERT sentiment classifier
(NEGATIVE/POSITIVE) with its OWN WordPiece tokenizer (BERT-style: lower-cased, [CLS] ... [SEP]),
trained here in seconds on the tiny example's review clauses. No download."""

from __future__ import annotations

import random
from pathlib import Path

from tiny_jobs import load_make_tiny

LABELS = {0: "NEGATIVE", 1: "POSITIVE"}  # distilbert-imdb's id2label
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def labelled_reviews(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Review openings + 1-5 clauses; label 1 when positive clauses outnumber negative ones."""
    make_tiny = load_make_tiny()
    rng = random.Random(seed)
    titles = make_tiny.titles()
    texts, labels = [], []
    while len(texts) < count:
        clauses = rng.randint(1, 5)
        positives = rng.randint(0, clauses)
        if 2 * positives == clauses:
            continue  # neutral: no label
        opening = make_tiny.prompt(rng, rng.choice(titles))
        texts.append(f"{opening} {make_tiny.with_positives(rng, positives, clauses)}")
        labels.append(int(2 * positives > clauses))
    return texts, labels


def wordpiece_tokenizer(texts: list[str], max_length: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, WordPieceTrainer(vocab_size=300, special_tokens=SPECIAL))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def make_classifier(out: Path, *, seed: int = 0, steps: int = 120, batch: int = 64) -> Path:
    """Train and `save_pretrained` the classifier and its tokenizer into `out`."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    texts, labels = labelled_reviews(4096, seed)
    max_length = 96
    tokenizer = wordpiece_tokenizer(texts, max_length)
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=max_length,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        id2label=LABELS,
        label2id={name: i for i, name in LABELS.items()},
    )
    model = DistilBertForSequenceClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(texts), (batch,), generator=generator).tolist()
        inputs = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
        loss = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=torch.tensor([labels[i] for i in rows]),
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def accuracy(directory: Path, count: int = 512, seed: int = 1) -> float:
    """Held-out accuracy of a saved classifier (reviews drawn with another seed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = labelled_reviews(count, seed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        inputs = tokenizer(texts, padding=True, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1)
    return (predicted == torch.tensor(labels)).float().mean().item()
