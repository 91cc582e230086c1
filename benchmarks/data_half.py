"""Data-half throughput and memory: MB/s per data asset on the embedded corpus, and peak memory at 4x the corpus.

    python benchmarks/data_half.py [--scales 1 4] [--out benchmarks/results/data_half_<date>.json]

Each scale runs in a fresh process: the data assets up to ``shards_pretrain`` materialized through Dagster
(in-process executor) on a local copy of the embedded corpus repeated ``scale`` times. Copy k > 0 has new doc
ids and the words of every line shuffled (seeded), so MinHash dedup keeps it and every stage downstream sees
~``scale`` x the text (language ID and the tokenizer do not care about word order; the quality filters drop a
few more shuffled documents). Reports seconds per asset, MB/s of corpus text per asset (raw corpus MB / asset
seconds) and peak resident memory: of the process (the Dagster run, in-process), of its largest descendant
(datatrove workers, the fastText trainer) and of both together. "Flat" memory means the 4x peak stays within
1.2x of the 1x peak. Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SELECTION = ("raw_corpus", "filtered_corpus", "language_id_model", "language_id_table", "tokenizer", "language_stats",
             "mixture_pretrain", "shards_pretrain")


def make_corpus(path: Path, scale: int) -> float:
    import polars as pl

    from mmbert_dagster.data import sources

    corpus = pl.read_parquet(sources.embedded_dir() / "corpus.parquet")

    def shuffled(k: int) -> pl.DataFrame:
        words = pl.element().str.split(" ").list.sample(fraction=1.0, shuffle=True, seed=k).list.join(" ")
        return corpus.with_columns(doc_id=pl.col("doc_id") + f"#copy{k}",
                                   text=pl.col("text").str.split("\n").list.eval(words).list.join("\n"))

    copies = [shuffled(k) if k else corpus for k in range(scale)]
    out = pl.concat(copies)
    out.write_parquet(path)
    return out["text"].str.len_bytes().sum() / 1e6


def child(corpus: str, home: str) -> None:
    """Materialize the selection in this process and print one JSON line of step durations and peak memory."""
    os.environ["MMBERT_HOME"] = home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import psutil  # a dagster dependency
    from dagster import DagsterInstance, materialize

    from mmbert_dagster.data import sources
    from mmbert_dagster.definitions import defs

    assets = [a for a in defs.assets if {k.to_user_string() for k in a.keys} & set(SELECTION)]
    config = {"resources": {"corpus": {"config": {"kind": "local", "paths": [corpus], "lang_field": "declared_lang",
                                                  "id_field": "doc_id",
                                                  "heldout_path": str(sources.embedded_heldout())}}}}
    peaks = {"child": 0, "total": 0}
    trace: list[tuple[float, int]] = []  # (time, process + children RSS)
    stop = threading.Event()

    def sample() -> None:
        # ru_maxrss of children is useless here (a forked child starts with the parent's pages counted), so
        # descendants (datatrove workers, the fastText trainer) are sampled from /proc every 0.2 s instead
        me = psutil.Process()
        while not stop.wait(0.2):
            rss = []
            for p in me.children(recursive=True):
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            peaks["child"] = max(peaks["child"], max(rss, default=0))
            total = me.memory_info().rss + sum(rss)
            peaks["total"] = max(peaks["total"], total)
            trace.append((time.time(), total))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    instance = DagsterInstance.ephemeral()
    result = materialize(assets, resources=defs.resources, instance=instance, run_config=config)
    stop.set()
    sampler.join()
    seconds, windows = {}, {}
    for record in instance.all_logs(result.run_id):
        event = record.dagster_event
        if event is None or not event.step_key:
            continue
        if event.event_type_value == "STEP_START":
            windows[event.step_key] = [record.timestamp, None]
        elif event.event_type_value == "STEP_SUCCESS":
            windows[event.step_key][1] = record.timestamp
            seconds[event.step_key] = event.event_specific_data.duration_ms / 1000
    step_peak_mb = {k: round(max((m for t, m in trace if a <= t <= b), default=0) / 2**20)
                    for k, (a, b) in windows.items() if b is not None}
    print(json.dumps({"success": result.success, "seconds": seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_child_rss_mb": peaks["child"] / 2**20, "peak_total_rss_mb": peaks["total"] / 2**20,
                      "step_peak_total_rss_mb": step_peak_mb}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    p.add_argument("--out", default="")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    results = []
    for scale in args.scales:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.parquet"
            mb = make_corpus(corpus, scale)
            proc = subprocess.run([sys.executable, __file__, "--child", str(corpus), str(Path(tmp) / "home")],
                                  capture_output=True, text=True, cwd=REPO)
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode or not line:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1]) | {"scale": scale, "corpus_mb": round(mb, 2)}
            r["mb_per_s"] = {k: round(mb / s, 3) for k, s in r["seconds"].items() if s > 0}
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| asset | " + " | ".join(f"{r['scale']}x s | {r['scale']}x MB/s | {r['scale']}x peak MB"
                                      for r in results) + " |")
    print("|---|" + "---|---|---|" * len(results))
    for key in SELECTION:
        cells = [f"{r['seconds'].get(key, float('nan')):.1f} | {r['mb_per_s'].get(key, float('nan')):.2f} | "
                 f"{r['step_peak_total_rss_mb'].get(key, 0)}" for r in results]
        print(f"| {key} | " + " | ".join(cells) + " |")
    for r in results:
        print(f"scale {r['scale']}x ({r['corpus_mb']} MB): peak RSS {r['peak_rss_mb']:.0f} MB, largest child "
              f"{r['peak_child_rss_mb']:.0f} MB, process + children {r['peak_total_rss_mb']:.0f} MB")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"peak memory {b['scale']}x / {a['scale']}x: {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} (process), "
              f"{b['peak_child_rss_mb'] / max(a['peak_child_rss_mb'], 1):.2f} (largest child), "
              f"{b['peak_total_rss_mb'] / max(a['peak_total_rss_mb'], 1):.2f} (process + children)")
    out = Path(args.out or REPO / f"benchmarks/results/data_half_{dt.date.today().isoformat()}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
