"""Reproducibility of the data half: the same input documents give byte-identical artifacts, whatever the
process (Python's salted string hashing), the row order polars hands a step, or the artifact root.

A data artifact that changes on re-materialization changes the shards' tokens and silently outdates every
checkpoint trained on them, so these compare bytes (the SHA-256s of every artifact's MANIFEST.json), not
statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from mmbert_dagster.artifacts import MANIFEST

from graph_helpers import DAGSTER, DATA_KEYS, REPO, cli_env, run_config, subset_corpus

# Trains the tokenizer the way the tokenizer asset does, on the documents of argv[1] in the row order given by
# seed argv[3] (polars' joins hand the asset its documents in a different order on every run).
_TRAIN_TOKENIZER = """
import sys
from pathlib import Path
import polars as pl
from mmbert_dagster.data import tokenizer
from mmbert_dagster.recipe import TokenizerConfig
docs = pl.read_parquet(sys.argv[1]).sample(fraction=1.0, shuffle=True, seed=int(sys.argv[3]))
cfg = TokenizerConfig(vocab_size=1024, sample_bytes_per_lang=8_000, min_frequency=2)
out = Path(sys.argv[2])
tokenizer.train_tokenizer(tokenizer.sample_for_tokenizer(docs, cfg, 1234), out, cfg, log=lambda _: None)
(out / "stats").mkdir()
tokenizer.tokens_per_byte(out, docs, cfg, 1234).write_parquet(out / tokenizer.FERTILITY_FILE)
"""


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The graph tests' corpus subset (60 languages, ~1.5 MB): ``subset.parquet`` as the corpus source reads it,
    ``labelled.parquet`` (lang, text) as the tokenizer asset reads it."""
    folder = tmp_path_factory.mktemp("corpus")
    subset_corpus(folder / "subset.parquet")
    pl.read_parquet(folder / "subset.parquet").select(lang="declared_lang", text="text").write_parquet(
        folder / "labelled.parquet")
    return folder


def test_tokenizer_is_byte_identical_across_processes_hash_seeds_and_row_orders(corpus, tmp_path):
    outs = []
    for run, (hash_seed, order_seed) in enumerate([(1, 0), (2, 1), (3, 2)]):
        out = tmp_path / f"tokenizer-{run}"
        proc = subprocess.run(
            [sys.executable, "-c", _TRAIN_TOKENIZER, str(corpus / "labelled.parquet"), str(out), str(order_seed)],
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)}, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(folder_bytes(out))
    assert "tokenizer.json" in outs[0] and "stats/fertility.parquet" in outs[0]
    for other in outs[1:]:
        assert other.keys() == outs[0].keys()
        differing = [name for name in outs[0] if other[name] != outs[0][name]]
        assert not differing, f"files differ between runs: {differing}"


def _manifest_files(home: Path, key: str) -> dict[str, dict]:
    return json.loads((home / "e2e" / key / MANIFEST).read_text())["files"]


@pytest.mark.slow
def test_data_half_is_byte_identical_when_materialized_twice(corpus, tmp_path):
    """Two CLI materializations of every data asset, in different artifact roots and hash seeds."""
    homes = [tmp_path / "a", tmp_path / "b"]
    for hash_seed, home in enumerate(homes, start=1):
        cmd = [DAGSTER, "asset", "materialize", "--select", ",".join(sorted(DATA_KEYS)),
               "--config-json", json.dumps(run_config(corpus / "subset.parquet"))]
        proc = subprocess.run(cmd, cwd=REPO, env=cli_env(home, PYTHONHASHSEED=str(hash_seed)), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    differing = []  # run times stay in Dagster metadata: no artifact file may differ
    for key in sorted(DATA_KEYS):
        a, b = (_manifest_files(home, key) for home in homes)
        assert a.keys() == b.keys(), f"{key}: different files {sorted(a.keys() ^ b.keys())}"
        differing += [f"{key}/{name}" for name in a if a[name] != b[name]]
    assert not differing, f"artifact files differ between two materializations: {differing}"
