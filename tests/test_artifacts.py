import os
import subprocess
import sys

import pytest

from mmbert_dagster.artifacts import ArtifactError, atomic_dir, clean_stale_temporaries, verify_artifact


def test_failed_write_leaves_the_previous_artifact_intact(tmp_path):
    final = tmp_path / "tiny" / "mixture_pretrain"
    with atomic_dir(final) as out:
        (out / "mixture.parquet").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as out:
            (out / "mixture.parquet").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (final / "mixture.parquet").read_text() == "v1"
    assert [p.name for p in final.parent.iterdir()] == ["mixture_pretrain"]  # no temporary left visible
    verify_artifact(final)


def test_truncated_or_corrupted_files_are_detected_by_name(tmp_path):
    final = tmp_path / "shards_pretrain"
    with atomic_dir(final) as out:
        (out / "tokens.ds").write_bytes(b"x" * 100)
        (out / "index").write_bytes(b"y" * 10)
    (final / "tokens.ds").write_bytes(b"x" * 50)
    with pytest.raises(ArtifactError, match=r"tokens\.ds is 50 bytes, expected 100 \(truncated\?\)"):
        verify_artifact(final)
    (final / "tokens.ds").write_bytes(b"x" * 99 + b"z")
    with pytest.raises(ArtifactError, match=r"tokens\.ds fails its SHA-256 check"):
        verify_artifact(final)


def test_missing_upstream_artifact_names_the_asset(tmp_path):
    with pytest.raises(ArtifactError, match="language_stats: missing artifact.*materialize"):
        verify_artifact(tmp_path / "language_stats", "language_stats")


def test_stale_temporaries_of_dead_processes_are_cleaned_but_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".mixture_pretrain.tmp-{dead_pid}-abcd").mkdir()
    (tmp_path / f".mixture_pretrain.tmp-{os.getppid()}-live").mkdir()  # a live writer of the same key
    (tmp_path / f".shards_pretrain.tmp-{dead_pid}-other").mkdir()  # another asset's temporary
    removed = clean_stale_temporaries(tmp_path, "mixture_pretrain")
    assert [p.name for p in removed] == [f".mixture_pretrain.tmp-{dead_pid}-abcd"]
    assert (tmp_path / f".shards_pretrain.tmp-{dead_pid}-other").exists()
    assert (tmp_path / f".mixture_pretrain.tmp-{os.getppid()}-live").exists()


def test_a_kill_between_the_renames_restores_the_old_version(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".tokenizer.old-{int(dead.stdout)}-abcd"
    old.mkdir()
    (old / "tokenizer.json").write_text("{}")
    clean_stale_temporaries(tmp_path, "tokenizer")
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_text() == "{}"
