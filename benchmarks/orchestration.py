"""Orchestration overhead: the embedded graph through Dagster vs the same asset functions called directly.

    python benchmarks/orchestration.py [--scope data|all] [--out benchmarks/results/orchestration_<date>.json]

Variants, each in a fresh process with a fresh artifact root (the embedded default corpus and recipe, tiny):

* ``direct``: every asset function, then its checks, called directly in topological order with the resources
  as arguments (Dagster's direct invocation: no executor, no instance, no event log) — the library calls
  the assets make, with nothing around them;
* ``in_process``: ``dagster.materialize`` of the same assets and checks (Dagster's in-process executor,
  an ephemeral instance);
* ``cli``: the README's `dagster asset materialize -m mmbert_dagster.definitions --select '*'` with the
  default executor (in-process, see mmbert_dagster/definitions.py) and a ``$DAGSTER_HOME`` holding
  scripts/dagster.yaml; then, in the same artifact root, ``--select decay_all+``;
* ``cli_multiprocess``: the same command with ``MMBERT_EXECUTOR=multiprocess`` (Dagster's process per step).

Overhead = variant seconds / direct seconds - 1 (target ≤ 15 %); ``decay_all+`` / whole ``cli`` graph (target
≤ 35 %). Every data asset is bit-reproducible (fastText trains with one thread; tests/test_reproducible.py), so
the variants train on the same shards. Waits for an idle machine first
(``benchmarks/run.py``'s /proc/stat check). Scope ``data`` stops after the data half (~6 min); ``all`` runs
the whole graph four times (~40 min on 2 cores). Not part of the unit tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_GROUPS = {"data", "mixtures", "tokens"}


def selected(defs, scope: str) -> tuple[list, list]:
    """(asset definitions in topological order, checks) of the scope."""
    graph = defs.resolve_asset_graph()
    order = [k for k in graph.toposorted_asset_keys
             if scope == "all" or graph.get(k).group_name in DATA_GROUPS]
    assets = [defs.get_assets_def(k) for k in order]
    keys = set(order)
    checks = [c for c in defs.asset_checks if {ck.asset_key for ck in c.check_keys} <= keys]
    return assets, checks


def run_direct(scope: str) -> dict:
    from dagster import build_asset_context

    from mmbert_dagster.definitions import defs

    assets, checks = selected(defs, scope)
    resources = defs.resources
    seconds = {}
    done, pending = set(), list(checks)
    for asset_def in assets:
        key = asset_def.key.to_user_string()
        kwargs = {k: resources[k] for k in asset_def.required_resource_keys if k in resources}
        start = time.perf_counter()
        asset_def(build_asset_context(), **kwargs)
        done.add(asset_def.key)
        # then every check whose assets are all materialized (some read several, e.g. the three decay mixtures)
        for check in [c for c in pending if set(c.keys_by_input_name.values()) <= done]:
            pending.remove(check)
            ckw = {k: resources[k] for k in check.required_resource_keys if k in resources}
            result = check(**ckw)
            if not result.passed and any(spec.blocking for spec in check.check_specs):
                raise RuntimeError(f"blocking check failed on {key}: {result.metadata}")
        seconds[key] = time.perf_counter() - start
    return {"seconds": seconds}


def run_in_process(scope: str) -> dict:
    from dagster import DagsterInstance, materialize

    from mmbert_dagster.definitions import defs

    assets, checks = selected(defs, scope)
    result = materialize([*assets, *checks], resources=defs.resources, instance=DagsterInstance.ephemeral())
    if not result.success:
        raise RuntimeError("materialize failed")
    seconds = {}
    for event in result.all_events:
        if event.event_type_value == "STEP_SUCCESS":
            seconds[event.step_key] = event.event_specific_data.duration_ms / 1000
    return {"seconds": seconds}


def child(variant: str, scope: str) -> None:
    start = time.perf_counter()
    r = run_direct(scope) if variant == "direct" else run_in_process(scope)
    r["wall_s"] = time.perf_counter() - start
    print("RESULT " + json.dumps(r), flush=True)


def run_variant(variant: str, scope: str, home: Path, select: str | None = None) -> dict:
    """One variant in a fresh process on artifact root ``home``; ``select`` overrides a CLI variant's selection."""
    env = {**os.environ, "MMBERT_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "HF_HUB_OFFLINE": "1"}
    env.pop("MMBERT_PRESET", None)
    env.pop("MMBERT_EXECUTOR", None)
    if variant == "cli_multiprocess":
        env["MMBERT_EXECUTOR"] = "multiprocess"
    (home / "dagster").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "scripts" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    start = time.perf_counter()
    if variant.startswith("cli"):
        select = select or ("*" if scope == "all" else " or ".join(f"group:{g}" for g in sorted(DATA_GROUPS)))
        cmd = [str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-m",
               "mmbert_dagster.definitions", "--select", select]
    else:
        cmd = [sys.executable, __file__, "--child", variant, "--scope", scope]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"{variant} failed (exit {proc.returncode})")
    out = {"variant": variant, "process_wall_s": round(wall, 1)}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if lines:
        r = json.loads(lines[-1][len("RESULT "):])
        out |= {"inner_wall_s": round(r["wall_s"], 1), "step_seconds": {k: round(v, 1) for k, v in r["seconds"].items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scope", choices=["data", "all"], default="all")
    p.add_argument("--variants", nargs="+", default=["direct", "in_process", "cli", "cli_multiprocess"])
    p.add_argument("--wait", type=float, default=120, help="max seconds to wait for an idle machine per variant")
    p.add_argument("--out", default="")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.scope)
        return 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    from run import wait_idle

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            busy = wait_idle(args.wait)
            home = Path(tmp) / variant
            r = run_variant(variant, args.scope, home) | {"cpu_busy_before": round(busy, 3)}
            print(json.dumps(r), flush=True)
            results.append(r)
            if variant == "cli" and args.scope == "all":  # then only decay_all and what is downstream of it
                r = run_variant("cli", args.scope, home, select="decay_all+") | {"variant": "cli decay_all+"}
                print(json.dumps(r), flush=True)
                results.append(r)
    by = {r["variant"]: r["process_wall_s"] for r in results}
    summary = {}
    if "direct" in by:
        summary = {f"{v}_overhead": round(by[v] / by["direct"] - 1, 3) for v in by if v != "direct" and "+" not in v}
    if "cli decay_all+" in by:
        summary["decay_all_plus_share"] = round(by["cli decay_all+"] / by["cli"], 3)
    print(f"\nscope {args.scope}: " + ", ".join(f"{v} {s:.0f} s" for v, s in by.items()))
    print(json.dumps(summary))
    out = Path(args.out or REPO / f"benchmarks/results/orchestration_{args.scope}_{dt.date.today().isoformat()}.json")
    out.write_text(json.dumps({"scope": args.scope, "results": results, "summary": summary}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
