"""Shards and a tokenizer for training-core tests: ~160 synthetic documents of 10 to ~600 tokens in two languages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from mmbert_dagster.data.shards import build_shards
from mmbert_dagster.data.tokenizer import train_tokenizer
from mmbert_dagster.recipe import Stage, TokenizerConfig

from model_helpers import VOCAB

WORDS = ("the of and to in is was for that with as on by language people world right free equal born "
         "der die und das ist nicht mit für auf dem eine Menschen Würde Recht frei gleich").split()
STAGE = Stage(
    name="pretrain", languages=2, tau=0.7, tokens=5 * 1024, max_repeat=5.0, english_boost=1.0, mask_rate=0.3,
    context_length=128, rope_theta=10_000.0, lr_peak=1e-3, lr_final=1e-3, warmup_tokens=2048, lr_decay="none",
    batch_tokens=1024, weight_decay=1e-5, betas=(0.9, 0.98), grad_clip=1.0, init_from="",
)
QUIET = lambda *_: None  # noqa: E731


def make_stage_data(root: Path) -> dict:
    """A tiny tokenizer and one stage's shards (documents of ~10 to ~600 tokens)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(160):
        lang = ("eng_Latn", "deu_Latn")[i % 2]
        n_words = int(rng.choice([8, 30, 80, 200, 350]))
        text = " ".join(rng.choice(WORDS, n_words)) + "."
        rows.append({"doc_id": f"{lang}-{i:04d}", "source": "synthetic", "declared_lang": lang, "text": text,
                     "lang": lang})
    docs = pl.DataFrame(rows)
    docs.select("doc_id", "source", "declared_lang", "text").write_parquet(root / "docs.parquet")
    docs.select("doc_id", "lang", pl.lit(True).alias("passed")).write_parquet(root / "lid.parquet")
    cfg = TokenizerConfig(vocab_size=VOCAB, sample_bytes_per_lang=50_000, min_frequency=2)
    train_tokenizer(((r["lang"], r["text"]) for r in rows), root / "tokenizer", cfg, log=QUIET)
    mixture = pl.DataFrame({"stage": ["pretrain"] * 2, "lang": ["eng_Latn", "deu_Latn"], "repeat_factor": [1.0, 1.0]})
    build_shards([root / "docs.parquet"], root / "lid.parquet", mixture, root / "tokenizer", root / "shards",
                 seed=0, log=QUIET)
    heldout = [" ".join(rng.choice(WORDS, 40)) for _ in range(6)]
    return {"root": root, "shards": root / "shards", "tokenizer": root / "tokenizer", "heldout": heldout}


