"""The typed mmBERT recipe: frozen dataclasses, loaded from a preset TOML and validated once — and the stage graph.

A preset (``mmbert_dagster/recipes/<name>.toml``) states the base stage once under ``[stages.base]``; every
stage then writes only what differs from the stage it ``extends``. The recipe's defaults live in the dataclass
fields of this file (settings of *where* work runs — devices, processes — live in the compute resource).

The stage graph is the recipe: every ``[stages.X]`` (other than ``base``) is a training stage with a mixture,
shards and a checkpoint; ``init_from`` names the earlier stage it continues from — or a released checkpoint
(``hf://org/name[@revision]``, a model folder or a Composer ``.pt``: the asset ``released_checkpoint``, see
``released.py``) —, ``data_from`` another stage
whose mixture and shards it reuses (a stage that differs only in training settings), ``[merge] weights`` the
stages merged into ``merged_model`` (and ``[merges.<key>]`` further merges, e.g. a plain average).
:func:`checkpoint_key` and :func:`mixture_key` / :func:`shards_key` name their assets.

Two recipe-level conveniences keep variants short: ``include = "<preset>"`` starts from another preset (tables
are merged, stages appended — the artifacts keep that preset's name, so a variant reuses them), and
``[replicas]`` repeats the stages and merges it names with other seeds (``<name>_seed<N>``: same data, another
data order, masks and merge), so a comparison can be measured over seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from mmbert_dagster.evaluate.finetune import FinetuneTask, FinetuneTaskError, task_from_table
from mmbert_dagster.released import ReleasedError, is_released_ref, parse_ref

PAPER_STAGES = ("pretrain", "midtrain", "decay_eng", "decay_cont", "decay_all")  # the paper's stage graph
# the stage fields a mixture and its shards depend on (a stage with ``data_from`` must agree on all of them)
DATA_FIELDS = ("languages", "tau", "tokens", "max_repeat", "english_boost", "replay_share", "replay_languages")
# asset keys that are not stages' (a stage's keys must not collide with them)
OTHER_KEYS = ("raw_corpus", "filtered_corpus", "language_id_model", "language_id_table", "language_stats",
              "tokenizer", "benchmark_scores", "released_checkpoint", "onnx_model")
MERGED_MODEL = "merged_model"  # the asset key of the ``[merge]`` section's merge (mmBERT's final model)
RELEASED_KEY = "released_checkpoint"  # the asset of a released checkpoint a stage continues from
MERGE_METHODS = ("ties", "linear")
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
LANG_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")  # ISO 639-3 + ISO 15924 script, e.g. deu_Latn


class RecipeError(ValueError):
    """An invalid recipe; the message names the file and the field."""


@dataclass(frozen=True)
class ModelShape:
    """ModernBERT shape (transformers' ModernBertConfig names in comments)."""

    layers: int = 22  # num_hidden_layers
    hidden: int = 768  # hidden_size
    intermediate: int = 1152  # intermediate_size (GLU: the projection is 2x this)
    heads: int = 12  # num_attention_heads
    global_every: int = 3  # global_attn_every_n_layers: layers 0, 3, 6, ... attend globally
    local_window: int = 128  # local_attention (tokens), the sliding window of the other layers
    local_rope_theta: float = 10_000.0  # local layers keep θ=10k when global θ is raised


@dataclass(frozen=True)
class LanguageIdConfig:
    model_path: str = ""  # a user-supplied fastText model (e.g. GlotLID); empty = train our own
    epochs: int = 25  # measured on the embedded corpus: 15 epochs underfit (0.77 vs 0.86 held-out accuracy)
    dim: int = 32
    min_count: int = 3  # words seen fewer times are dropped (char n-grams still cover them); keeps the model small
    char_ngrams: tuple[int, int] = (2, 5)  # minn, maxn
    word_ngrams: int = 2  # token bigrams; with unspaced scripts split into characters = character bigrams
    buckets: int = 100_000  # hashed n-gram rows: model size ≈ buckets × dim × 4 bytes
    lr: float = 0.8
    threads: int = 1  # 1: the same model bit for bit on every run (measured; 35 s on the embedded corpus); more
    # threads train faster (2: 18 s) but fastText's lock-free updates then give a different model each run
    min_heldout_accuracy: float = 0.3  # below this a trained model is taken as diverged and retrained at lr / 2
    max_train_chars_per_lang: int = 40_000  # caps the big languages so training stays fast and balanced
    holdout_fraction: float = 0.1  # documents held out to measure accuracy and calibrate thresholds
    max_heldout_chars_per_lang: int = 30_000  # ~100 held-out chunks per language: enough for thresholds, and
    # language ID's memory does not grow with the corpus
    threshold_quantile: float = 0.05  # per-language threshold = this quantile of correct held-out scores
    min_threshold: float = 0.3
    max_threshold: float = 0.9


@dataclass(frozen=True)
class FilterConfig:
    min_doc_chars: int = 200
    min_doc_words: int = 30
    max_doc_words: int = 100_000
    max_non_alpha_words_ratio: float = 0.6  # min share of words with an alphabetic character (Gopher's naming)
    max_symbol_word_ratio: float = 0.1
    max_duplicate_line_fraction: float = 0.3  # FineWeb-style line repetition
    minhash_ngram: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8


@dataclass(frozen=True)
class TokenizerConfig:
    pretrained_path: str = ""  # a tokenizer.json file or HF folder (e.g. Gemma-2's); empty = train BPE
    vocab_size: int = 8192
    sample_bytes_per_lang: int = 100_000  # training sample: this much text per language on average ...
    sample_tau: float = 0.0  # ... shared ∝ a language's bytes ** sample_tau (0: the same for every language; the
    # pre-training τ gives the large languages, which most tokens come from, a vocabulary of their own)
    min_frequency: int = 2


@dataclass(frozen=True)
class MergeConfig:
    """TIES merge of the decay variants relative to the mid-training checkpoint (paper: all three, density 0.8);
    ``method = "linear"``: mergekit's plain weighted average of the weights (density unused) — the ablation."""

    method: str = "ties"  # "ties" | "linear"
    density: float = 0.8  # fraction of each task vector kept (largest magnitudes): trims the 20 % smallest deltas
    weights: dict[str, float] = field(default_factory=lambda: {"decay_eng": 1.0, "decay_cont": 1.0, "decay_all": 1.0})
    scale: float = 1.0  # lambda: the merged task vector is multiplied by this before it is added back


@dataclass(frozen=True)
class HfTask:
    """A sentence-classification task from Hugging Face ``datasets`` (online, or a local copy), probed linearly."""

    name: str  # the row's task name in benchmark_scores, e.g. "sst2"
    path: str  # load_dataset(path, ...): hub name ("nyu-mll/glue") or a local folder / data files
    config: str = ""  # load_dataset's second argument (e.g. "sst2"); empty = none
    text_fields: tuple[str, ...] = ("sentence",)  # joined with [SEP] for pairs, e.g. ["premise", "hypothesis"]
    label_field: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    lang: str = "eng_Latn"
    max_train: int = 2000  # examples used to fit the probe (frozen embeddings: this is cheap)
    max_eval: int = 1000


@dataclass(frozen=True)
class EvalConfig:
    """The offline stand-ins for the paper's benchmarks (see mmbert_dagster/evaluate) and optional online tasks."""

    languages_per_tier: int = 24  # held-out languages scored per tier (high / mid / low / unseen), plus English
    mask_rate: float = 0.15  # masked-token accuracy on held-out text: the share of tokens hidden
    max_texts_per_lang: int = 6  # held-out texts per language for masked-token accuracy
    probe_train_tier: str = "high"  # the cross-lingual probe is fitted on English + this tier, tested on the rest
    batch_tokens: int = 8192  # packed inference micro-batch
    hf_tasks: tuple[HfTask, ...] = ()  # e.g. GLUE/XNLI (need `datasets` and a network or a local copy)
    finetune: tuple[FinetuneTask, ...] = ()  # [[eval.finetune]]: fine-tuned tasks (evaluate/finetune.py) — the
    # offline stand-in (no dataset) or GLUE / XNLI / WikiANN / CoNLL layouts from the hub or a local folder
    mteb_tasks: tuple[str, ...] = ()  # MTEB task names (e.g. "SciFact", "Tatoeba"): run when online, or from a
    # local copy under <artifact root>/.cache/mteb/tasks/<Task> (evaluate/embeddings.py); else skipped with a note
    mteb_languages: tuple[str, ...] = ()  # keep only these languages' subsets of the MTEB tasks (empty: all)
    onnx_batch_size: int = 8  # onnx_model: texts per padded batch of the onnxruntime-vs-PyTorch throughput ...
    onnx_repeats: int = 3  # ... and passes over the batches per engine (timed side by side, alternating)
    new_languages: tuple[str, ...] = ()  # languages a released checkpoint never saw (the extend preset): scored
    # as their own tier "new" (all of them), and the findings compare the extension with the released model there


@dataclass(frozen=True)
class Stage:
    name: str
    languages: int | str | tuple[str, ...]  # top-N by tokens, "all", or explicit codes
    tau: float  # temperature: p_lang ∝ tokens_lang ** tau
    tokens: int  # token budget of the stage
    max_repeat: float  # cap on upsampling by repetition (epochs over a language's data)
    english_boost: float  # multiplies English's sampling weight (Decay-Eng)
    mask_rate: float  # MLM masking probability (80/10/10 replacement)
    context_length: int  # tokens per sequence
    rope_theta: float  # global-attention RoPE θ
    lr_peak: float
    lr_final: float
    warmup_tokens: int
    lr_decay: str  # "none" (warmup then constant) | "1-sqrt" | "linear"
    batch_tokens: int  # tokens per optimizer step
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    init_from: str  # "" (random init), the earlier stage whose checkpoint this stage continues, or a released
    # checkpoint: hf://org/name[@revision], a Hugging Face model folder, or a Composer .pt (released.py)
    data_from: str = ""  # "" (own mixture and shards) or the stage whose mixture and shards this stage reuses
    shuffle_window_docs: int = 64  # pieces of this many consecutive documents are read in a shuffled order
    # (train/packing.py); 1 reads them in order, so one long document fills several optimizer steps in a row
    batch_warmup_tokens: int = 0  # batch-size warm-up: over the stage's first this many tokens, the tokens per
    # step grow linearly from batch_warmup_min_tokens to batch_tokens (Composer's batch_size_warmup_tokens; 0: none)
    batch_warmup_min_tokens: int = 0  # the first step's tokens (mmBERT: 48 sequences); 0 = context_length
    seed: int = 0  # 0 = the recipe's seed; another value trains the same stage with another data order and masks
    # (and init, from random) — what [replicas] sets
    replay_share: float = 0.0  # > 0: this share of the tokens goes to the replay languages (those the model already
    # knows) and the rest to the other stage languages, each group τ-sampled on its own (sql/stage_mixture.sql)
    replay_languages: int | tuple[str, ...] = ()  # the replay group: the top N languages by tokens, or codes
    local_rope_theta: float = 0.0  # the local (sliding-window) layers' RoPE θ from this stage on; 0 = keep the
    # model's ([model].local_rope_theta on a random init, the checkpoint's when continuing). mmBERT: 160k from
    # the context extension on (local_attn_rotary_emb_base in configs/mmBERT-*-ext.yaml)


@dataclass(frozen=True)
class Replicas:
    """The stages and merges trained again with other seeds, so that comparisons can be measured over seeds."""

    seeds: tuple[int, ...] = ()  # extra seeds (the originals keep the recipe's seed)
    stages: tuple[str, ...] = ()  # each gets <stage>_seed<N>, reusing the stage's mixture and shards
    merges: tuple[str, ...] = ()  # each gets <merge>_seed<N>, merging the stages' replicas of that seed


@dataclass(frozen=True)
class Recipe:
    name: str
    source_file: str
    model: ModelShape
    filters: FilterConfig
    lid: LanguageIdConfig
    tokenizer: TokenizerConfig
    tier_high: int  # languages ranked by tokens: the top `tier_high` are "high" resource
    tier_mid: int  # ... the next up to rank `tier_mid` are "mid"; the rest "low"
    english: str  # the English code English-boosted stages refer to
    seed: int
    stages: dict[str, Stage] = field(default_factory=dict)
    merges: dict[str, MergeConfig] = field(default_factory=dict)  # asset key -> merge; [merge] is merged_model
    replicas: Replicas = field(default_factory=Replicas)
    eval: EvalConfig = field(default_factory=EvalConfig)
    include: str = ""  # the preset this recipe started from (see the module docstring)
    model_fields: tuple[str, ...] = ()  # the [model] fields the recipe states (a released checkpoint must agree)

    def stage(self, name: str) -> Stage:
        try:
            return self.stages[name]
        except KeyError:
            raise RecipeError(f"{self.source_file}: no stage {name!r}; stages are {list(self.stages)}") from None

    def data_stage(self, name: str) -> str:
        """The stage whose mixture and shards ``name`` trains on (itself unless it says ``data_from``)."""
        return self.stage(name).data_from or name

    @property
    def data_stages(self) -> list[str]:
        """Stages that build their own mixture and shards, in recipe order."""
        return [name for name, s in self.stages.items() if not s.data_from]

    @property
    def merge(self) -> MergeConfig:
        """The ``[merge]`` section: the merge that gives ``merged_model``."""
        return self.merges[MERGED_MODEL]

    def merge_base_of(self, key: str) -> str:
        """The stage every stage of merge ``key`` continues from: task vectors are taken relative to its checkpoint."""
        return self.stage(next(iter(self.merges[key].weights))).init_from

    @property
    def merge_base(self) -> str:
        return self.merge_base_of(MERGED_MODEL)

    @property
    def released(self) -> str:
        """The released checkpoint some stage continues from (``init_from`` reference), or ""."""
        return next((s.init_from for s in self.stages.values() if is_released_ref(s.init_from)), "")

    def continues_released(self, name: str) -> bool:
        """Stage ``name`` descends from the released checkpoint (its model is the checkpoint's shape)."""
        s = self.stage(name)
        while s.init_from and not is_released_ref(s.init_from):
            s = self.stage(s.init_from)
        return is_released_ref(s.init_from)

    def stage_seed(self, name: str) -> int:
        """The seed stage ``name`` trains with: its own ``seed`` if set, else the recipe's."""
        return self.stage(name).seed or self.seed

    def seed_groups(self) -> dict[str, list[str]]:
        """checkpoint or merge key -> that key and its seed replicas' keys (findings average over a group); a
        replica is only in its original's group."""
        key = lambda name: checkpoint_key(name) if name in self.stages else name  # noqa: E731
        groups = {key(name): [key(name)] + [key(replica_name(name, s)) for s in self.replicas.seeds]
                  for name in (*self.replicas.stages, *self.replicas.merges)}
        replicas = {k for keys in groups.values() for k in keys[1:]}
        for k in [*([RELEASED_KEY] if self.released else []), *map(checkpoint_key, self.stages), *self.merges]:
            if k not in replicas:
                groups.setdefault(k, [k])
        return groups

    def lineage(self) -> dict[str, str | None]:
        """checkpoint key -> the checkpoint key it continues from (None: random init), in recipe order."""
        return {checkpoint_key(n): checkpoint_key(s.init_from) if s.init_from else None
                for n, s in self.stages.items()}

    def section_hash(self, *parts: str, extra: str = "") -> str:
        """A short, stable hash of recipe sections (``"lid"``, ``"stages.pretrain"``...) for code versions."""
        data = {}
        for part in parts:
            obj: Any = self
            for attr in part.split("."):
                obj = obj[attr] if isinstance(obj, dict) else getattr(obj, attr)
            data[part] = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
        blob = json.dumps(data, sort_keys=True, default=str) + extra
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_key(stage: str) -> str:
    """The asset key of a stage's checkpoint: a decay stage (name starting with ``decay``) is a product named by
    the stage itself (``decay_all``, ``decay_all_mask30``); any other stage's is ``<stage>_checkpoint``
    (``pretrain_checkpoint``); a released checkpoint's (an ``init_from`` reference) is ``released_checkpoint``."""
    if is_released_ref(stage):
        return RELEASED_KEY
    return stage if stage.startswith("decay") else f"{stage}_checkpoint"


def replica_name(name: str, seed: int) -> str:
    """The stage or merge that ``[replicas]`` derives from ``name`` for ``seed``."""
    return f"{name}_seed{seed}"


def mixture_key(stage: str) -> str:
    return f"mixture_{stage}"


def shards_key(stage: str) -> str:
    return f"shards_{stage}"


def _build(cls, table: dict, where: str, **fixed):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(names - set(fixed))}")
    kwargs = {**table, **fixed}
    for f in dataclasses.fields(cls):
        if f.name in kwargs and isinstance(kwargs[f.name], list):
            kwargs[f.name] = tuple(kwargs[f.name])
    try:
        return cls(**kwargs)
    except TypeError as e:
        missing = [
            f.name for f in dataclasses.fields(cls)
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        raise RecipeError(f"{where}: missing field(s) {missing}") from e


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"{where}: {msg}")


def _validate_stage(s: Stage, where: str) -> None:
    _check(isinstance(s.tau, (int, float)) and 0 < s.tau <= 1, f"{where}.tau", f"must be in (0, 1], got {s.tau!r}")
    _check(isinstance(s.tokens, int) and s.tokens > 0, f"{where}.tokens", f"must be a positive integer, got {s.tokens!r}")
    _check(s.max_repeat >= 1, f"{where}.max_repeat", f"must be >= 1, got {s.max_repeat!r}")
    _check(s.english_boost > 0, f"{where}.english_boost", f"must be > 0, got {s.english_boost!r}")
    _check(0 < s.mask_rate < 1, f"{where}.mask_rate", f"must be in (0, 1), got {s.mask_rate!r}")
    _check(s.context_length >= 16, f"{where}.context_length", f"must be >= 16 tokens, got {s.context_length!r}")
    _check(s.rope_theta > 0, f"{where}.rope_theta", f"must be > 0, got {s.rope_theta!r}")
    _check(s.local_rope_theta >= 0, f"{where}.local_rope_theta", f"must be > 0 (or 0: keep the model's), got "
           f"{s.local_rope_theta!r}")
    _check(s.lr_peak > 0, f"{where}.lr_peak", f"must be > 0, got {s.lr_peak!r}")
    _check(0 < s.lr_final <= s.lr_peak, f"{where}.lr_final", f"must be in (0, lr_peak], got {s.lr_final!r}")
    _check(s.lr_decay in ("none", "1-sqrt", "linear"), f"{where}.lr_decay", f"must be none|1-sqrt|linear, got {s.lr_decay!r}")
    _check(s.batch_tokens >= s.context_length, f"{where}.batch_tokens", "must be >= context_length")
    _check(len(s.betas) == 2 and all(0 < b < 1 for b in s.betas), f"{where}.betas", f"must be two values in (0, 1), got {s.betas!r}")
    _check(s.warmup_tokens >= 0, f"{where}.warmup_tokens", f"must be >= 0, got {s.warmup_tokens!r}")
    _check(s.weight_decay >= 0, f"{where}.weight_decay", f"must be >= 0, got {s.weight_decay!r}")
    _check(s.shuffle_window_docs >= 1, f"{where}.shuffle_window_docs", f"must be >= 1, got {s.shuffle_window_docs!r}")
    _check(isinstance(s.seed, int) and s.seed >= 0, f"{where}.seed", f"must be an integer >= 0, got {s.seed!r}")
    _check(s.batch_warmup_tokens >= 0, f"{where}.batch_warmup_tokens", f"must be >= 0, got {s.batch_warmup_tokens!r}")
    _check(0 <= s.batch_warmup_min_tokens <= s.batch_tokens, f"{where}.batch_warmup_min_tokens",
           f"must be in [0, batch_tokens = {s.batch_tokens}], got {s.batch_warmup_min_tokens!r}")
    _check(0 <= s.replay_share < 1, f"{where}.replay_share", f"must be in [0, 1), got {s.replay_share!r}")
    if s.replay_share > 0:
        _check(bool(s.replay_languages), f"{where}.replay_languages",
               "name the languages the model already knows (a count of top languages or a list of codes) when "
               "replay_share > 0")
    if isinstance(s.replay_languages, int):
        _check(s.replay_languages > 0, f"{where}.replay_languages", f"must be > 0, got {s.replay_languages!r}")
    else:
        bad = [c for c in s.replay_languages if not LANG_CODE.match(str(c))]
        _check(not bad, f"{where}.replay_languages", f"unknown language code(s) {bad}: use ISO 639-3 + script")
    if isinstance(s.languages, str):
        _check(s.languages == "all", f"{where}.languages", f"must be a count, 'all' or a list of codes, got {s.languages!r}")
    elif isinstance(s.languages, int):
        _check(s.languages > 0, f"{where}.languages", f"must be > 0, got {s.languages!r}")
    else:
        bad = [c for c in s.languages if not LANG_CODE.match(str(c))]
        _check(not bad, f"{where}.languages", f"unknown language code(s) {bad}: use ISO 639-3 + script, e.g. deu_Latn")
        _check(len(s.languages) > 0, f"{where}.languages", "must not be empty")


def _build_merge(table: dict, where: str, stages: dict[str, Stage]) -> MergeConfig:
    merge = _build(MergeConfig, table, where)
    _check(merge.method in MERGE_METHODS, f"{where}.method", f"must be one of {MERGE_METHODS}, got {merge.method!r}")
    _check(0 < merge.density <= 1, f"{where}.density", f"must be in (0, 1], got {merge.density}")
    _check(merge.scale > 0, f"{where}.scale", f"must be > 0, got {merge.scale}")
    unknown = [m for m in merge.weights if m not in stages]
    _check(not unknown, f"{where}.weights", f"unknown stage(s) {unknown}; stages are {list(stages)}")
    _check(len(merge.weights) >= 2, f"{where}.weights", "name at least two stages to merge")
    _check(all(w > 0 for w in merge.weights.values()), f"{where}.weights", "weights must be > 0")
    parents = {m: stages[m].init_from for m in merge.weights}
    _check(len(set(parents.values())) == 1 and all(parents.values()), f"{where}.weights",
           f"the merged stages must continue from one stage (task vectors are relative to it); init_from: {parents}")
    return merge


def _build_merges(data: dict, source: str, stages: dict[str, Stage]) -> dict[str, MergeConfig]:
    """``[merge]`` (= merged_model) and every ``[merges.<key>]``, each validated against the stages."""
    merges = {MERGED_MODEL: _build_merge(data.pop("merge", {}), f"{source}: [merge]", stages)}
    extra = data.pop("merges", {})
    _check(isinstance(extra, dict), f"{source}: merges", "must be a table of [merges.<key>] tables")
    for key, table in extra.items():
        where = f"{source}: [merges.{key}]"
        _check(STAGE_NAME.match(key) is not None, where, "a merge key is lower-case letters, digits and '_'")
        _check(key != MERGED_MODEL, where, "merged_model is the [merge] section's; name this merge otherwise")
        _check(isinstance(table, dict), where, "must be a table")
        merges[key] = _build_merge(table, where, stages)
    return merges


def _expand_replicas(rep: Replicas, stages: dict[str, Stage], merges: dict[str, MergeConfig], source: str
                     ) -> tuple[dict[str, Stage], dict[str, MergeConfig]]:
    """The recipe's stages and merges plus ``<name>_seed<N>`` for every seed and listed stage / merge. A replica
    trains on its original's data (``data_from``) and continues from its parent's replica of the same seed when
    the parent is replicated too, else from the parent itself."""
    where = f"{source}: [replicas]"
    _check(all(isinstance(x, int) and x > 0 for x in rep.seeds) and len(set(rep.seeds)) == len(rep.seeds),
           f"{where}.seeds", f"must be distinct positive integers, got {list(rep.seeds)}")
    unknown = [n for n in rep.stages if n not in stages]
    _check(not unknown, f"{where}.stages", f"unknown stage(s) {unknown}; stages are {list(stages)}")
    unknown = [m for m in rep.merges if m not in merges]
    _check(not unknown, f"{where}.merges", f"unknown merge(s) {unknown}; merges are {list(merges)}")
    _check(bool(rep.seeds) or not (rep.stages or rep.merges), f"{where}.seeds", "name at least one seed")
    stages, merges = dict(stages), dict(merges)
    for seed in rep.seeds:
        for name in [n for n in list(stages) if n in rep.stages]:
            s = stages[name]
            init = replica_name(s.init_from, seed) if s.init_from in rep.stages else s.init_from
            stages[replica_name(name, seed)] = dataclasses.replace(
                s, name=replica_name(name, seed), seed=seed, data_from=s.data_from or name, init_from=init)
        for key in rep.merges:
            m = merges[key]
            weights = {(replica_name(n, seed) if n in rep.stages else n): w for n, w in m.weights.items()}
            merges[replica_name(key, seed)] = dataclasses.replace(m, weights=weights)
    return stages, merges


def _validate_shape(m: ModelShape, where: str) -> None:
    """ModernBERT's constraints on its shape (transformers checks some only when the model is built)."""
    for name in ("layers", "hidden", "intermediate", "heads", "global_every", "local_window"):
        value = getattr(m, name)
        _check(isinstance(value, int) and value >= 1, f"{where}.{name}", f"must be a positive integer, got {value!r}")
    _check(m.hidden % m.heads == 0, f"{where}.heads",
           f"must divide hidden: hidden = {m.hidden} is not a multiple of heads = {m.heads}")
    _check((m.hidden // m.heads) % 2 == 0, f"{where}.heads",
           f"hidden / heads = {m.hidden // m.heads} must be even (RoPE rotates pairs of dimensions)")
    _check(m.local_window % 2 == 0, f"{where}.local_window",
           f"must be even (half the window on each side of a token), got {m.local_window}")
    _check(m.local_rope_theta > 0, f"{where}.local_rope_theta", f"must be > 0, got {m.local_rope_theta}")


def _validate_graph(stages: dict[str, Stage], source: str, merges: dict[str, MergeConfig]) -> None:
    """init_from names an earlier stage; data_from a stage with its own data and the same data fields; keys unique."""
    order = list(stages)
    for i, (name, s) in enumerate(stages.items()):
        where = f"{source}: stages.{name}"
        _check(STAGE_NAME.match(name) is not None, where,
               "a stage name is lower-case letters, digits and '_', starting with a letter")
        if is_released_ref(s.init_from):
            others = {x.init_from for x in stages.values() if is_released_ref(x.init_from)} - {s.init_from}
            _check(not others, f"{where}.init_from", f"a recipe continues one released checkpoint; "
                   f"{s.init_from!r} and {sorted(others)} are named")
            try:
                parse_ref(s.init_from)
            except ReleasedError as e:
                raise RecipeError(f"{where}.init_from: {e}") from None
        elif s.init_from:
            _check(s.init_from in order[:i], f"{where}.init_from",
                   f"must name an earlier stage (one of {order[:i]}) or a released checkpoint (hf://org/name, a "
                   f"model folder, a Composer .pt), got {s.init_from!r}")
        if s.data_from:
            _check(s.data_from in stages and s.data_from != name, f"{where}.data_from",
                   f"must name another stage (one of {[n for n in order if n != name]}), got {s.data_from!r}")
            source_stage = stages[s.data_from]
            _check(not source_stage.data_from, f"{where}.data_from",
                   f"{s.data_from!r} itself reuses {source_stage.data_from!r}'s data: name {source_stage.data_from!r}")
            for f in DATA_FIELDS:
                mine, theirs = getattr(s, f), getattr(source_stage, f)
                _check(mine == theirs, f"{where}.{f}",
                       f"{mine!r} differs from stages.{s.data_from}.{f} = {theirs!r}, but data_from = "
                       f"{s.data_from!r} reuses that stage's mixture and shards; drop data_from or the difference")
    keys = [k for n in stages for k in (checkpoint_key(n), mixture_key(n), shards_key(n))] + list(OTHER_KEYS) + list(merges)
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    _check(not clashes, f"{source}: stages", f"stage names give clashing asset keys {clashes}; rename the stage")


def _build_eval(table: dict, where: str) -> EvalConfig:
    table = dict(table)
    tasks = []
    for i, t in enumerate(table.pop("hf_tasks", [])):
        _check(isinstance(t, dict), f"{where}.hf_tasks[{i}]", "must be a table")
        t = dict(t)
        if "text_fields" in t:
            t["text_fields"] = tuple(t["text_fields"])
        tasks.append(_build(HfTask, t, f"{where}.hf_tasks[{i}]"))
    finetune = []
    for i, t in enumerate(table.pop("finetune", [])):
        try:
            finetune.append(task_from_table(t, f"{where}.finetune[{i}]"))
        except FinetuneTaskError as e:
            raise RecipeError(str(e)) from None
    names = [t.name for t in finetune] + [t.name for t in tasks]
    _check(len(set(names)) == len(names), f"{where}.finetune", f"task names must be unique, got {names}")
    table["finetune"] = tuple(finetune)
    for key in ("new_languages", "mteb_tasks", "mteb_languages"):
        if key in table:
            table[key] = tuple(table[key])
    ev = _build(EvalConfig, table, where, hf_tasks=tuple(tasks))
    _check(0 < ev.mask_rate < 1, f"{where}.mask_rate", f"must be in (0, 1), got {ev.mask_rate}")
    _check(ev.probe_train_tier in ("high", "mid", "low"), f"{where}.probe_train_tier",
           f"must be high, mid or low, got {ev.probe_train_tier!r}")
    _check(ev.max_texts_per_lang >= 1, f"{where}.max_texts_per_lang", "must be >= 1")
    _check(ev.languages_per_tier >= 1, f"{where}.languages_per_tier", "must be >= 1")
    _check(ev.onnx_batch_size >= 1, f"{where}.onnx_batch_size", "must be >= 1")
    _check(ev.onnx_repeats >= 1, f"{where}.onnx_repeats", "must be >= 1")
    for key in ("new_languages", "mteb_languages"):
        bad = [c for c in getattr(ev, key) if not LANG_CODE.match(str(c))]
        _check(not bad, f"{where}.{key}", f"unknown language code(s) {bad}: use ISO 639-3 + script")
    return ev


def _preset_text(preset_or_path: str | Path) -> tuple[str, str]:
    """(source name, TOML text) of a preset name or a .toml path."""
    text_path = Path(str(preset_or_path))
    if text_path.suffix == ".toml":
        if not text_path.is_file():
            raise RecipeError(f"{text_path}: recipe file does not exist")
        return str(text_path), text_path.read_text()
    available = sorted(p.name[:-5] for p in resources.files("mmbert_dagster.recipes").iterdir() if p.name.endswith(".toml"))
    if str(preset_or_path) not in available:
        raise RecipeError(f"unknown preset {preset_or_path!r}; presets are {available} (or pass a .toml path)")
    ref = resources.files("mmbert_dagster.recipes") / f"{preset_or_path}.toml"
    return f"recipes/{preset_or_path}.toml", ref.read_text()


def _merge_tables(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: tables merged key by key (new stages appended in order), values replaced."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge_tables(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_toml(preset_or_path: str | Path, chain: tuple[str, ...] = ()) -> tuple[str, dict]:
    """A recipe's TOML as a dict, with its ``include`` resolved (the included preset underneath)."""
    source, raw = _preset_text(preset_or_path)
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{source}: not valid TOML: {e}") from e
    include = data.pop("include", "")
    if include:
        _check(isinstance(include, str), f"{source}: include", f"must be a preset name or .toml path, got {include!r}")
        _check(source not in chain, f"{source}: include", f"cycle {' -> '.join((*chain, source))}")
        _, base = _read_toml(include, (*chain, source))
        data = {**_merge_tables(base, data), "include": str(include)}
    return source, data


def load_recipe(preset_or_path: str | Path = "tiny") -> Recipe:
    """Load a preset by name (``tiny``, ``small``, ``base``) or a recipe TOML file by path, and validate it."""
    source, data = _read_toml(preset_or_path)
    return recipe_from_dict(data, source)


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    data = json.loads(json.dumps(data))  # deep copy; TOML gives only JSON types
    stages_raw = data.pop("stages", None)
    _check(isinstance(stages_raw, dict), source, "missing [stages] table")
    base = stages_raw.pop("base", None)
    _check(isinstance(base, dict), f"{source}: stages.base", "missing; every stage extends it")
    model_table = data.get("model", {})
    sections = {
        "model": (ModelShape, data.pop("model", {})),
        "filters": (FilterConfig, data.pop("filters", {})),
        "lid": (LanguageIdConfig, data.pop("lid", {})),
        "tokenizer": (TokenizerConfig, data.pop("tokenizer", {})),
    }
    built = {k: _build(cls, t, f"{source}: [{k}]") for k, (cls, t) in sections.items()}
    _validate_shape(built["model"], f"{source}: [model]")
    built["eval"] = _build_eval(data.pop("eval", {}), f"{source}: [eval]")
    _check(bool(stages_raw), f"{source}: stages", "no stage besides [stages.base]; add e.g. [stages.pretrain]")

    resolved: dict[str, dict] = {"base": base}

    def resolve(name: str, chain: tuple[str, ...] = ()) -> dict:
        if name in resolved:
            return resolved[name]
        _check(name not in chain, f"{source}: stages.{name}.extends", f"cycle {' -> '.join(chain + (name,))}")
        delta = dict(stages_raw[name])
        parent = delta.pop("extends", "base")
        _check(parent == "base" or parent in stages_raw, f"{source}: stages.{name}.extends",
               f"unknown stage {parent!r}; stages are {['base', *stages_raw]}")
        resolved[name] = {**resolve(parent, chain + (name,)), **delta}
        return resolved[name]

    stages = {}
    for name in stages_raw:
        where = f"{source}: stages.{name}"
        stage = _build(Stage, resolve(name), where, name=name)
        _validate_stage(stage, where)
        stages[name] = stage
    merges = _build_merges(data, source, stages)
    replicas = _build(Replicas, data.pop("replicas", {}), f"{source}: [replicas]")
    stages, merges = _expand_replicas(replicas, stages, merges, source)
    _validate_graph(stages, source, merges)
    built.update(merges=merges, replicas=replicas)

    top = {k: data.pop(k) for k in list(data)}
    recipe = _build(Recipe, top, f"{source}: top level", source_file=source, stages=stages,
                    model_fields=tuple(sorted(model_table)), **built)
    # the name is a folder under the artifact root: a plain name, so no recipe can write outside the root
    _check(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", recipe.name) is not None, f"{source}: name",
           f"must be a plain folder name (letters, digits, '_', '-', '.'), got {recipe.name!r}")
    _check(LANG_CODE.match(recipe.english) is not None, f"{source}: english", f"unknown language code {recipe.english!r}")
    _check(0 < recipe.tier_high <= recipe.tier_mid, f"{source}: tier_high", "must satisfy 0 < tier_high <= tier_mid")
    _check(recipe.tokenizer.vocab_size >= 256, f"{source}: [tokenizer].vocab_size", "must be >= 256")
    _check(0 < recipe.lid.holdout_fraction < 0.5, f"{source}: [lid].holdout_fraction", "must be in (0, 0.5)")
    _check(recipe.lid.threads >= 1, f"{source}: [lid].threads", "must be >= 1")
    _check(0 <= recipe.lid.min_heldout_accuracy < 1, f"{source}: [lid].min_heldout_accuracy", "must be in [0, 1)")
    return recipe


def preset_from_env() -> str:
    """``MMBERT_PRESET``: a preset name (tiny, small, base) or a path to a recipe .toml; default ``tiny``."""
    return os.environ.get("MMBERT_PRESET", "tiny")


_ACTIVE: dict[str, Recipe] = {}


def active_recipe() -> Recipe:
    """The recipe this process works with: the one ``MMBERT_PRESET`` names, loaded and validated once.

    The asset graph is built from it when the code location loads, and the artifact store places every artifact
    under its name, so the two cannot disagree. (Cached per value of the variable: tests switch recipes in one
    process; a code location picks up an edited TOML when it is reloaded, which starts a new process.)
    """
    preset = preset_from_env()
    if preset not in _ACTIVE:
        _ACTIVE[preset] = load_recipe(preset)
    return _ACTIVE[preset]
