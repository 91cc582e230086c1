"""A stage's inputs — shards, tokenizer, the checkpoint it continues from — and the checks that they fit together.

Token ids mean something only under the tokenizer that produced them. The shards record the SHA-256 of the
``tokenizer.json`` they were built with (``ShardReader.check_tokenizer``), and every stage output carries a copy
of its tokenizer (``export.write_hf_folder``), so a stage refuses, before its first step, shards or an init
checkpoint made with another tokenizer than the stage's: after the tokenizer changed, a decay would otherwise
train a mid-training checkpoint on shards whose ids no longer line up with its embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmbert_dagster.data.shard_reader import ShardReader
from mmbert_dagster.artifacts import sha256_file
from mmbert_dagster.data.tokenizer import TOKENIZER_FILE, load_tokenizer, special_token_ids


class TokenizerMismatch(ValueError):
    """An init checkpoint trained with another tokenizer than the stage's."""


@dataclass(frozen=True)
class Vocabulary:
    """The stage tokenizer's vocabulary size and special token ids."""

    size: int
    specials: dict[str, int]  # role -> id: pad, cls, sep, mask (+ unk, bos, eos where declared)

    @property
    def mask_id(self) -> int:
        return self.specials["mask"]

    @property
    def never_mask(self) -> list[int]:
        """Ids masking never selects (every special token)."""
        return sorted(set(self.specials.values()))


def read_vocabulary(tokenizer_dir: Path) -> Vocabulary:
    """The vocabulary of a tokenizer folder; ``ValueError`` if it is not one or lacks a pad/cls/sep/mask token."""
    tok = load_tokenizer(tokenizer_dir)  # TokenizerError (a ValueError) naming the file if it is missing
    specials = special_token_ids(Path(tokenizer_dir))
    missing = {"pad", "cls", "sep", "mask"} - set(specials)
    if missing:
        raise ValueError(f"{tokenizer_dir}: the tokenizer declares no {sorted(missing)} token(s)")
    return Vocabulary(tok.get_vocab_size(), specials)


def check_init_tokenizer(init_from: Path, tokenizer_dir: Path) -> None:
    """Raise ``TokenizerMismatch`` unless the checkpoint ``init_from`` was trained with ``tokenizer_dir``'s tokenizer:
    the same ``tokenizer.json`` bytes, or (a released checkpoint's tokenizer, adopted with truncation and padding
    switched off) the same vocabulary — every token with the same id."""
    have, want = Path(init_from) / TOKENIZER_FILE, Path(tokenizer_dir) / TOKENIZER_FILE
    if not have.is_file():
        raise TokenizerMismatch(f"{have}: missing, so the init checkpoint cannot be checked against the stage's "
                                f"tokenizer {want}; continue only from a stage output (it carries its tokenizer)")
    have_sha, want_sha = sha256_file(have), sha256_file(want)
    if have_sha != want_sha and not _same_vocabulary(have, want):
        raise TokenizerMismatch(
            f"the init checkpoint was trained with another tokenizer than this stage's: {have} (SHA-256 "
            f"{have_sha[:12]}) vs {want} ({want_sha[:12]}); its token ids do not line up with the shards — "
            f"re-materialize the checkpoint it continues from with this tokenizer")


def _same_vocabulary(a: Path, b: Path) -> bool:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(a)).get_vocab(True) == Tokenizer.from_file(str(b)).get_vocab(True)
    except Exception:  # an unreadable file is a mismatch, reported with both paths by the caller
        return False


def open_inputs(shards_dir: Path, tokenizer_dir: Path, init_from: Path | None) -> tuple[ShardReader, Vocabulary]:
    """The stage's documents and vocabulary, once shards and init checkpoint are known to use the stage's tokenizer."""
    reader = ShardReader(Path(shards_dir))
    vocab = read_vocabulary(tokenizer_dir)
    reader.check_tokenizer(tokenizer_dir, vocab.size, vocab.specials)
    if init_from:
        check_init_tokenizer(init_from, tokenizer_dir)
    return reader, vocab
