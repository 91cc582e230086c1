"""Offline stand-ins for the paper's benchmarks, as plain functions of embeddings / predictions.

* :func:`mask_for_eval` + :func:`masked_token_accuracy` — held-out masked-token accuracy (the MLM itself);
* :func:`retrieval_accuracy` — cross-lingual retrieval (Tatoeba/MTEB bitext stand-in): for every text in a
  language, is its aligned English text the nearest English text by cosine similarity of mean-pooled embeddings?
* :func:`probe_accuracy` — a linear probe on frozen embeddings (GLUE/XNLI stand-in): scikit-learn's logistic
  regression fitted on some languages, accuracy on every language (zero-shot cross-lingual transfer, as XNLI's
  "train on English, test on all").

They know nothing about models or files; ``evaluate/suite.py`` feeds them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from mmbert_dagster.train.packing import IGNORE


def mask_for_eval(ids: np.ndarray, rate: float, mask_id: int, never: Iterable[int],
                  generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Hide ``round(rate x maskable)`` (at least 1) non-special tokens behind ``[MASK]`` (no 80/10/10 at eval).

    Returns (input ids, labels with IGNORE where nothing is asked). Deterministic for a seeded ``generator``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    maskable = np.flatnonzero(~np.isin(ids, np.fromiter(never, dtype=np.int64)))
    labels = np.full_like(ids, IGNORE)
    if maskable.size == 0:
        return ids.copy(), labels
    n = max(1, int(round(rate * maskable.size)))
    chosen = maskable[torch.randperm(maskable.size, generator=generator)[:n].numpy()]
    labels[chosen] = ids[chosen]
    masked = ids.copy()
    masked[chosen] = mask_id
    return masked, labels


def masked_token_accuracy(pairs: Sequence[tuple[np.ndarray, ...]]) -> tuple[float, int]:
    """(share of masked tokens predicted exactly, number of masked tokens) over (true, predicted, ...) arrays."""
    true = np.concatenate([t for t, *_ in pairs]) if pairs else np.zeros(0)
    pred = np.concatenate([p[1] for p in pairs]) if pairs else np.zeros(0)
    if true.size == 0:
        return float("nan"), 0
    return float((true == pred).mean()), int(true.size)


def masked_token_cross_entropy(results: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """Mean cross-entropy (nats) of the true tokens at the masks, over (true, predicted, cross-entropy) arrays:
    finer than top-1 accuracy for small models, which are mostly wrong but wrong by less as they learn."""
    nll = np.concatenate([r[2] for r in results]) if results else np.zeros(0)
    return float(nll.mean()) if nll.size else float("nan")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_accuracy(queries: np.ndarray, query_keys: Sequence, targets: np.ndarray,
                       target_keys: Sequence) -> float:
    """Accuracy@1: share of queries whose most cosine-similar target has the same key (e.g. the article number).

    Queries whose key has no target are not counted; NaN if none is countable.
    """
    keys = list(target_keys)
    countable = [i for i, k in enumerate(query_keys) if k in keys]
    if not countable:
        return float("nan")
    sims = _normalize(queries[countable]) @ _normalize(targets).T
    best = sims.argmax(1)
    return float(np.mean([keys[b] == query_keys[i] for b, i in zip(best, countable)]))


def probe_accuracy(train_x: np.ndarray, train_y: Sequence, tests: Mapping[str, tuple[np.ndarray, Sequence]],
                   seed: int = 0) -> dict[str, float]:
    """Fit a logistic regression on (train_x, train_y); accuracy on each named test set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(max_iter=2000, C=1.0, random_state=seed).fit(scaler.transform(train_x), list(train_y))
    return {name: float((clf.predict(scaler.transform(x)) == np.asarray(y)).mean()) for name, (x, y) in tests.items()
            if len(y)}
