"""Real sentence-classification tasks (GLUE / XNLI style) from Hugging Face ``datasets``, when a user is online.

Each ``[[eval.hf_tasks]]`` entry names a dataset (hub name or local folder / files), its text and label fields and
splits. Every model is scored the same way as the offline topic probe: mean-pooled frozen embeddings, a logistic
regression fitted on up to ``max_train`` training examples, accuracy on up to ``max_eval`` evaluation examples.
(The paper fine-tunes; a linear probe is what fits a nightly evaluation on any machine, and it ranks
checkpoints the same way for a fixed recipe.)

Offline, or without ``datasets``, a task is skipped with a note that says why — never an error: the nightly
evaluation must not fail because the network is down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mmbert_dagster.evaluate.metrics import probe_accuracy
from mmbert_dagster.recipe import HfTask


def load_task(task: HfTask):
    """(train texts, train labels, eval texts, eval labels) or raise with the reason."""
    import datasets

    args = (task.path, task.config) if task.config else (task.path,)
    ds = datasets.load_dataset(*args)
    for split in (task.train_split, task.eval_split):
        if split not in ds:
            raise KeyError(f"split {split!r} not in {task.path} (has {sorted(ds)})")
    out = []
    for split, limit in ((task.train_split, task.max_train), (task.eval_split, task.max_eval)):
        part = ds[split]
        missing = [f for f in (*task.text_fields, task.label_field) if f not in part.column_names]
        if missing:
            raise KeyError(f"{task.path}[{split}] has no field(s) {missing} (has {part.column_names})")
        part = part.select(range(min(limit, len(part))))
        texts = [" [SEP] ".join(str(row[f]) for f in task.text_fields) for row in part]
        out += [texts, list(part[task.label_field])]
    return tuple(out)


def run_hf_task(task: HfTask, encoders: Mapping, *, tier: str, seed: int,
                log: Callable[[str], None] = print) -> tuple[list[dict], str | None]:
    """Rows (model, task, lang, tier, "accuracy", value) for every encoder, or ([], why it was skipped)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return [], f"{task.name}: skipped — Hugging Face `datasets` is not installed (pip install '.[hf]')"
    try:
        train_x, train_y, eval_x, eval_y = load_task(task)
    except Exception as e:  # offline (HF_DATASETS_OFFLINE / no network), unknown dataset, wrong fields
        return [], f"{task.name}: skipped — could not load {task.path!r}: {type(e).__name__}: {e}"
    log(f"{task.name}: {len(train_x)} training / {len(eval_x)} evaluation examples from {task.path}")
    rows = []
    for name, enc in encoders.items():
        acc = probe_accuracy(enc.embed(train_x), train_y, {"eval": (enc.embed(eval_x), eval_y)}, seed=seed)["eval"]
        rows.append({"model": name, "task": task.name, "lang": task.lang, "tier": tier, "metric": "accuracy",
                     "value": acc})
    return rows, None
