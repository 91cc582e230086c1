"""The data half on each executor, and our filtering's overhead over datatrove alone.

    python benchmarks/scale_out.py [--scale 1] [--out benchmarks/results/scale_out_<date>.json]

1. The data assets up to ``shards_pretrain`` (``benchmarks/data_half.py``'s child: a fresh process and artifact
   root each, Dagster in-process) with ``MMBERT_DATA_EXECUTOR`` = local (1 and 2 workers) and ray (a Ray
   instance started by the asset with 1 and 2 CPUs, 2 tasks): seconds and MB/s of corpus text per asset and for
   the data half, peak memory (the process and everything below it, Ray's raylet and workers included), and
   whether the kept documents equal the local run's.
2. Overhead: ``run_filters`` (what the ``filtered_corpus`` asset calls) against the same datatrove stages run
   alone on the same raw_corpus file (``filtering._run_datatrove`` in a child process, as ``run_filters`` runs
   it, without our input checks, the dedup's smallest-doc_id rule and the outputs), 2 workers, alternating, medians
   of 2; the asset's Dagster step time of the local 2-worker run beside it.

On a 2-core machine Ray cannot beat the local pool: the point is that the cluster path works and costs what it
costs. Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from data_half import SELECTION, make_corpus  # noqa: E402

RUNS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))  # (executor, workers or Ray CPUs)


def run_child(corpus: Path, home: Path, kind: str, n: int) -> dict:
    env = dict(os.environ, MMBERT_DATA_EXECUTOR=kind, HF_HUB_OFFLINE="1")
    if kind == "ray":
        env |= {"MMBERT_RAY_NUM_CPUS": str(n), "MMBERT_DATA_WORKERS": "2"}  # 2 tasks on n CPUs
    else:
        env["MMBERT_DATA_WORKERS"] = str(n)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "data_half.py"), "--child", str(corpus),
                           str(home)], capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not line:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return json.loads(line[-1])


def overhead_pairs(corpus: Path, work: Path, workers: int, repeats: int = 2) -> dict:
    """Our run_filters (what the asset calls: input checks, datatrove, the dedup rule, the outputs) vs the same
    datatrove stages alone (the child process run_filters starts), alternating on the same file; medians."""
    import dataclasses
    import statistics

    from mmbert_dagster.data import filtering
    from mmbert_dagster.recipe import load_recipe

    cfg = load_recipe("tiny").filters
    times: dict[str, list[float]] = {"run_filters": [], "datatrove_alone": []}
    for i in range(repeats):
        for name in (("run_filters", "datatrove_alone") if i % 2 == 0 else ("datatrove_alone", "run_filters")):
            t0 = time.perf_counter()
            if name == "run_filters":
                out = work / f"out-{i}"
                out.mkdir(parents=True)
                filtering.run_filters([corpus], out, cfg, work / "runs", workers=workers, log=lambda _: None)
            else:
                run = work / f"alone-{i}"
                run.mkdir(parents=True)
                spec = {"inputs": [str(corpus)], "run_dir": str(run), "cfg": dataclasses.asdict(cfg),
                        "workers": workers, "executor": None}
                filtering._run_in_subprocess(spec, lambda _: None)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": times, "median_run_filters_s": round(med["run_filters"], 2),
            "median_datatrove_alone_s": round(med["datatrove_alone"], 2),
            "overhead": round(med["run_filters"] / med["datatrove_alone"] - 1, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--out", default="")
    p.add_argument("--overhead-only", metavar="PARQUET", default="",
                   help="only the overhead pairs, on this raw_corpus part file")
    args = p.parse_args(argv)
    import polars as pl

    if args.overhead_only:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(overhead_pairs(Path(args.overhead_only), Path(tmp), workers=2)))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        mb = make_corpus(corpus, args.scale)
        kept = {}
        for kind, n in RUNS:
            home = Path(tmp) / f"home-{kind}-{n}"
            r = run_child(corpus, home, kind, n)
            data_half = sum(r["seconds"].get(k, 0.0) for k in SELECTION)
            docs = pl.read_parquet(home / "tiny" / "filtered_corpus" / "docs.parquet")
            kept[(kind, n)] = docs["doc_id"].to_list()
            results.append({"executor": kind, "n": n, "corpus_mb": round(mb, 2), "seconds": r["seconds"],
                            "data_half_s": round(data_half, 1), "data_half_mb_per_s": round(mb / data_half, 3),
                            "filtered_corpus_mb_per_s": round(mb / r["seconds"]["filtered_corpus"], 3),
                            "peak_total_rss_mb": round(r["peak_total_rss_mb"]),
                            "same_kept_documents_as_local_1": kept[(kind, n)] == kept[RUNS[0]]})
            print(json.dumps(results[-1]), flush=True)
        raw = sorted((Path(tmp) / "home-local-2" / "tiny" / "raw_corpus" / "docs").glob("*.parquet"))
        overhead = overhead_pairs(raw[0] if len(raw) == 1 else corpus, Path(tmp) / "overhead", workers=2)
    asset = next(r for r in results if (r["executor"], r["n"]) == ("local", 2))["seconds"]["filtered_corpus"]
    overhead["filtered_corpus_asset_s"] = round(asset, 2)  # the Dagster step of the local 2-worker run
    print(json.dumps(overhead))
    print("\n| executor | workers / Ray CPUs | filtered_corpus s | MB/s | data half s | data half MB/s | "
          "peak MB | same kept docs |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['executor']} | {r['n']} | {r['seconds']['filtered_corpus']:.1f} | "
              f"{r['filtered_corpus_mb_per_s']:.2f} | {r['data_half_s']:.1f} | {r['data_half_mb_per_s']:.2f} | "
              f"{r['peak_total_rss_mb']} | {r['same_kept_documents_as_local_1']} |")
    print(f"\nrun_filters {overhead['median_run_filters_s']:.1f} s vs datatrove alone "
          f"{overhead['median_datatrove_alone_s']:.1f} s (medians of {len(overhead['seconds']['run_filters'])}, "
          f"alternating): overhead {100 * overhead['overhead']:+.1f} %; the filtered_corpus asset step "
          f"{asset:.1f} s")
    out = Path(args.out or REPO / f"benchmarks/results/scale_out_{dt.date.today().isoformat()}.json")
    out.write_text(json.dumps({"runs": results, "overhead": overhead}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
