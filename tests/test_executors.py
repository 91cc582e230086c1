"""mmbert_dagster.data.executors: datatrove pipelines on this machine, a local Ray instance and a stand-in Slurm.

The Ray tests share one Ray instance (2 CPUs, started and shut down by the ``ray_settings`` fixture) and run the
project's own filter steps (mmbert_dagster.data.filtering), uploaded to the workers as runtime_env ``py_modules``
(the way a remote cluster gets them). The Slurm tests put tests/data/fake_slurm (sbatch, squeue, sacct, scancel,
scontrol, srun that run the job array on this machine) first on PATH.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from datatrove.pipeline.base import PipelineStep

from mmbert_dagster.data import executors
from mmbert_dagster.data.executors import (
    DataExecutorError,
    DataExecutorSettings,
    ensure_ray,
    run_pipeline,
    settings_from_env,
    shutdown_ray,
)

TESTS = Path(__file__).resolve().parent
FAKE_SLURM = TESTS / "data" / "fake_slurm" / "fake_slurm.py"
TASKS = 4


# --------------------------------------------------------------------------------------------------------------
# Pipeline steps of the tests (importable by Ray workers and Slurm tasks: PYTHONPATH holds tests/)

class CountRuns(PipelineStep):
    """Appends a line to ``<folder>/<rank>.runs`` each time task ``rank`` runs; passes documents through."""

    name = "count_runs"

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"{rank}.runs"), "a") as f:
            f.write(f"{os.getpid()}\n")
        if data:
            yield from data


class FailOnRank(PipelineStep):
    """Raises in task ``rank`` (after reading its documents)."""

    name = "fail_on_rank"

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        for doc in data or ():
            yield doc
        if rank == self.rank:
            raise ValueError(f"boom on rank {rank}")


def _runs(folder: Path) -> dict[int, int]:
    return {int(p.stem): len(p.read_text().split()) for p in folder.glob("*.runs")}


# --------------------------------------------------------------------------------------------------------------
# The project's filter steps over a small corpus

SENTENCES = [
    "The village library opened its doors again last spring after a long renovation.",
    "Volunteers repainted the reading room and repaired the old wooden shelves.",
    "On Saturday mornings the librarian reads stories to the children of the town.",
    "Their parents browse the new collection of local history and old photographs.",
    "Many residents say that the library has become the heart of the community.",
    "Students prepare for their exams there, and older people learn to use computers.",
    "The council has promised to keep the building open until late in the evening.",
]


def _corpus(folder: Path, n: int = 72) -> list[str]:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        kind = i % 6
        if kind == 0:  # too short: normalize drops it
            text = rng.choice(SENTENCES)
        elif kind == 1:  # hash-tag spam: gopher_quality drops it
            text = " ".join(f"#{w}" for w in " ".join(rng.sample(SENTENCES, 5)).split())
        else:
            text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(4, 9)))
        rows.append({"doc_id": f"d{i:04d}", "source": "test", "declared_lang": "eng_Latn", "text": text})
    files = []
    for part in range(3):
        path = folder / f"part-{part}.parquet"
        pl.DataFrame(rows[part::3]).write_parquet(path)
        files.append(str(path))
    return files


def _filter_pipeline(files: list[str], out: Path, counter: Path | None = None, fail_rank: int | None = None) -> list:
    from mmbert_dagster.data.filtering import (
        DocWriter,
        DropWriter,
        Ftfy,
        MinChars,
        ParquetInput,
        PerProfileFilter,
        StripControls,
        _gopher_quality,
    )
    from mmbert_dagster.recipe import FilterConfig

    cfg = FilterConfig()
    steps = [ParquetInput(files), Ftfy(normalization="NFC"), StripControls(),
             MinChars(cfg.min_doc_chars, DropWriter(str(out / "drops" / "normalize"), "normalize")),
             PerProfileFilter("gopher_quality", _gopher_quality, cfg,
                              DropWriter(str(out / "drops" / "gopher_quality"), "gopher_quality"))]
    if counter is not None:
        steps.append(CountRuns(str(counter)))
    if fail_rank is not None:
        steps.append(FailOnRank(fail_rank))
    return steps + [DocWriter(str(out / "kept"))]


def _kept(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "kept").glob("*.parquet"))).sort("doc_id")


def _drops(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted((out / "drops").glob("*/*.parquet"))).sort("doc_id")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def local_reference(corpus, tmp_path_factory):
    """The filter pipeline run by LocalPipelineExecutor: (kept, drops, seconds)."""
    run = tmp_path_factory.mktemp("local")
    lines = []
    summary = run_pipeline(_filter_pipeline(corpus, run / "out"), DataExecutorSettings(kind="local", workers=1),
                           tasks=TASKS, logging_dir=run / "logs", name="filter", log=lines.append)
    assert summary["completed"] == TASKS and summary["failed"] == [] and summary["kind"] == "local"
    assert sum("filter: task" in ln for ln in lines) == TASKS, lines
    kept, drops = _kept(run / "out"), _drops(run / "out")
    assert 0 < kept.height < 72 and set(drops["step"]) == {"normalize", "gopher_quality"}
    return kept, drops, summary["seconds"]


# --------------------------------------------------------------------------------------------------------------
# Local

def test_local_failure_names_rank_and_resume(corpus, local_reference, tmp_path):
    settings = DataExecutorSettings(kind="local", workers=1)
    out, logs, counter = tmp_path / "out", tmp_path / "logs", tmp_path / "runs"
    with pytest.raises(DataExecutorError) as err:
        run_pipeline(_filter_pipeline(corpus, out, counter, fail_rank=1), settings, tasks=TASKS, logging_dir=logs,
                     name="filter", log=lambda _: None)
    # workers=1: datatrove stops at the failed task; the later ones never started
    assert err.value.failed == [1, 2, 3]
    message = str(err.value)
    assert "rank 1" in message and "boom on rank 1" in message and str(logs / "logs" / "task_00001.log") in message
    assert "rank 2" in message and "did not start" in message
    summary = run_pipeline(_filter_pipeline(corpus, out, counter), settings, tasks=TASKS, logging_dir=logs,
                           name="filter", log=lambda _: None)
    assert summary["skipped"] == 1 and summary["completed"] == TASKS
    assert _runs(counter) == {0: 1, 1: 2, 2: 1, 3: 1}
    assert _kept(out).equals(local_reference[0])


# --------------------------------------------------------------------------------------------------------------
# Ray (one local instance of 2 CPUs for the module)

@pytest.fixture(scope="module")
def ray_settings(tmp_path_factory):
    pytest.importorskip("ray")
    settings = DataExecutorSettings(kind="ray", ray_num_cpus=2, ray_ship_code=True, mem_per_cpu_gb=1)
    with pytest.MonkeyPatch.context() as mp:
        # Ray puts the driver's working directory first on the workers' sys.path: away from the repository, the
        # workers import the uploaded copy of mmbert_dagster, as on a cluster without this checkout
        mp.chdir(tmp_path_factory.mktemp("ray_cwd"))
        # the workers import this module's steps (CountRuns, FailOnRank); mmbert_dagster is shipped as py_modules
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
        mp.setenv("OMP_NUM_THREADS", "1")
        t0 = time.perf_counter()
        assert ensure_ray(settings, log=print)
        startup = time.perf_counter() - t0
        try:
            yield settings, startup
        finally:
            assert shutdown_ray()
    import ray

    assert not ray.is_initialized()


@pytest.mark.timeout(180)
def test_ray_workers_import_shipped_package(ray_settings):
    import ray

    @ray.remote
    def where():
        import mmbert_dagster
        import test_executors  # PYTHONPATH reaches the workers too

        return mmbert_dagster.__file__, test_executors.__file__

    package, tests = ray.get(where.remote(), timeout=120)
    assert "runtime_resources" in package and package.endswith("mmbert_dagster/__init__.py"), package
    assert tests == __file__


@pytest.mark.timeout(180)
def test_local_and_ray_identical(corpus, local_reference, ray_settings, tmp_path):
    settings, startup = ray_settings
    lines = []
    summary = run_pipeline(_filter_pipeline(corpus, tmp_path / "out"), settings, tasks=TASKS,
                           logging_dir=tmp_path / "logs", name="filter", log=lines.append)
    assert summary["kind"] == "ray" and summary["completed"] == TASKS and summary["skipped"] == 0
    assert sorted(int(ln.split("task ")[1].split()[0]) for ln in lines if " done, " in ln) == list(range(TASKS))
    kept, drops, local_seconds = local_reference
    assert _kept(tmp_path / "out").equals(kept)  # same documents, same normalized texts
    assert _drops(tmp_path / "out").equals(drops)
    assert (tmp_path / "logs" / "stats.json").is_file()
    assert all((tmp_path / "logs" / "logs" / f"task_{r:05d}.log").is_file() for r in range(TASKS))
    print(f"\nseconds: local {local_seconds:.1f}, ray {summary['seconds']:.1f} (+ ray start {startup:.1f})")


@pytest.mark.timeout(240)
def test_ray_resume_runs_only_missing_tasks(corpus, local_reference, ray_settings, tmp_path):
    settings, _ = ray_settings
    out, logs, counter = tmp_path / "out", tmp_path / "logs", tmp_path / "runs"
    run_pipeline(_filter_pipeline(corpus, out, counter), settings, tasks=TASKS, logging_dir=logs, name="filter",
                 log=lambda _: None)
    assert _runs(counter) == {r: 1 for r in range(TASKS)}
    # a run killed mid-way: tasks 1 and 3 left neither a completion marker nor outputs
    for rank in (1, 3):
        (logs / "completions" / f"{rank:05d}").unlink()
        for f in out.glob(f"**/{rank:05d}.parquet"):
            f.unlink()
    lines = []
    summary = run_pipeline(_filter_pipeline(corpus, out, counter), settings, tasks=TASKS, logging_dir=logs,
                           name="filter", log=lines.append)
    assert summary["skipped"] == 2 and summary["completed"] == TASKS
    assert _runs(counter) == {0: 1, 1: 2, 2: 1, 3: 2}
    assert any("2 of 4 task(s) to run" in ln for ln in lines), lines
    assert _kept(out).equals(local_reference[0]) and _drops(out).equals(local_reference[1])
    # nothing left: a third run does nothing
    summary = run_pipeline(_filter_pipeline(corpus, out, counter), settings, tasks=TASKS, logging_dir=logs,
                           name="filter", log=lambda _: None)
    assert summary["skipped"] == TASKS and _runs(counter) == {0: 1, 1: 2, 2: 1, 3: 2}


# --- the graph's own data functions on Ray: the same kept documents, drop reasons and shard tokens as local

def _embedded_sample(folder: Path) -> list[Path]:
    """~40 documents in each of 8 languages of the embedded corpus (+ exact copies, for the dedup) in 2 files."""
    from mmbert_dagster.data.sources import embedded_dir

    docs = pl.read_parquet(embedded_dir() / "corpus.parquet")
    langs = ["eng_Latn", "deu_Latn", "rus_Cyrl", "cmn_Hans", "arb_Arab", "hin_Deva", "swh_Latn", "yor_Latn"]
    sample = pl.concat([docs.filter(pl.col("declared_lang") == lang).sort("doc_id").head(40) for lang in langs])
    copies = sample.head(6).with_columns(pl.col("doc_id") + "-copy")
    sample = pl.concat([sample, copies]).sort("doc_id")
    folder.mkdir(parents=True, exist_ok=True)
    half = sample.height // 2
    files = [folder / "part-0.parquet", folder / "part-1.parquet"]
    sample.head(half).write_parquet(files[0])
    sample.tail(sample.height - half).write_parquet(files[1])
    return files


@pytest.fixture(scope="module")
def embedded_local(tmp_path_factory):
    from mmbert_dagster.data.filtering import run_filters
    from mmbert_dagster.recipe import load_recipe

    root = tmp_path_factory.mktemp("embedded")
    files = _embedded_sample(root / "raw")
    cfg = load_recipe("tiny").filters
    (root / "local").mkdir()
    report = run_filters(files, root / "local", cfg, root / "work", workers=2, log=lambda _: None)
    return files, cfg, report


@pytest.mark.timeout(300)
def test_filters_on_ray_keep_the_same_documents_for_the_same_reasons(embedded_local, ray_settings, tmp_path):
    from mmbert_dagster.data.filtering import run_filters

    files, cfg, local = embedded_local
    settings, _ = ray_settings
    (tmp_path / "out").mkdir()
    lines = []
    report = run_filters(files, tmp_path / "out", cfg, tmp_path / "work", workers=2, executor=settings,
                         log=lines.append)
    local_dir = files[0].parent.parent / "local"
    for name in ("docs.parquet", "drops.parquet", "drop_counts.parquet"):
        assert pl.read_parquet(tmp_path / "out" / name).equals(pl.read_parquet(local_dir / name)), name
    assert report.docs_out == local.docs_out > 0 and report.docs_in == local.docs_in
    assert any("exact_duplicate" == r for r in pl.read_parquet(tmp_path / "out" / "drops.parquet")["reason"])
    assert any("filter-quality: task" in ln and " done, " in ln for ln in lines), lines  # per-task progress
    assert [p.name for p in (tmp_path / "work").iterdir() if p.name.startswith("run-ray-")] == []  # renamed


@pytest.mark.timeout(300)
def test_a_killed_ray_filter_run_resumes_from_the_finished_stage(embedded_local, ray_settings, tmp_path,
                                                                 monkeypatch):
    """Killed after the quality-filter stage (here: the next stage's executor fails to start), re-materialized on
    the same inputs: the finished stage's tasks are not run again, and the result equals a clean run."""
    from mmbert_dagster.data import filtering

    files, cfg, local = embedded_local
    settings, _ = ray_settings

    class Killed(Exception):
        pass

    def killed(*args, **kwargs):
        raise Killed("the run was killed")

    real = filtering.MinhashDedupBuckets
    monkeypatch.setattr(filtering, "MinhashDedupBuckets", killed)
    (tmp_path / "out").mkdir()
    with pytest.raises(Killed):
        filtering.run_filters(files, tmp_path / "out", cfg, tmp_path / "work", workers=2, executor=settings,
                              log=lambda _: None)
    runs = [p for p in (tmp_path / "work").iterdir() if p.name.startswith("run-ray-")]
    assert len(runs) == 1 and len(list((runs[0] / "logs" / "filter" / "completions").iterdir())) == 2
    monkeypatch.setattr(filtering, "MinhashDedupBuckets", real)
    lines = []
    report = filtering.run_filters(files, tmp_path / "out", cfg, tmp_path / "work", workers=2, executor=settings,
                                   log=lines.append)
    assert any("(resuming)" in ln for ln in lines), lines
    assert any("filter-quality: all 2 task(s) already complete" in ln for ln in lines), lines
    assert report.docs_out == local.docs_out
    local_dir = files[0].parent.parent / "local"
    assert pl.read_parquet(tmp_path / "out" / "docs.parquet").equals(pl.read_parquet(local_dir / "docs.parquet"))


@pytest.mark.timeout(300)
def test_shards_tokenized_on_ray_equal_the_local_ones(embedded_local, ray_settings, tmp_path):
    """The same documents, order and tokens: one datatrove task per output file, on Ray or in a local child."""
    from mmbert_dagster.data.shards import build_shards
    from mmbert_dagster.data.tokenizer import sample_for_tokenizer, train_tokenizer
    from mmbert_dagster.recipe import TokenizerConfig

    files, _, _ = embedded_local
    settings, _ = ray_settings
    docs = pl.read_parquet(files[0].parent.parent / "local" / "docs.parquet")
    lid = docs.select("doc_id", pl.col("declared_lang").alias("lang"), pl.lit(0.99).alias("lid_score"),
                      pl.lit(True).alias("passed"))
    lid.write_parquet(tmp_path / "lid.parquet")
    langs = sorted(set(docs["declared_lang"]))
    mix = pl.DataFrame({"stage": ["pretrain"] * len(langs), "lang": langs, "tokens_available": [1000] * len(langs),
                        "share": [1 / len(langs)] * len(langs), "tokens_target": [1000] * len(langs),
                        "repeat_factor": [1.5] * len(langs)})
    cfg = TokenizerConfig(vocab_size=1000, sample_bytes_per_lang=20_000, min_frequency=2)
    train_tokenizer(sample_for_tokenizer(docs.with_columns(lang=pl.col("declared_lang")), cfg, seed=1),
                    tmp_path / "tok", cfg, log=lambda *_: None)
    out = {}
    for kind, executor in (("local", None), ("ray", settings)):
        out[kind] = tmp_path / kind
        out[kind].mkdir()
        build_shards([files[0].parent.parent / "local" / "docs.parquet"], tmp_path / "lid.parquet", mix,
                     tmp_path / "tok", out[kind], seed=7, max_tokens_per_file=20_000, executor=executor,
                     log=lambda *_: None)
    names = sorted(p.name for p in out["local"].iterdir())
    assert names == sorted(p.name for p in out["ray"].iterdir()) and sum(n.endswith(".ds") for n in names) > 1
    for name in names:
        if name != "shards.json":  # holds the seconds
            assert (out["local"] / name).read_bytes() == (out["ray"] / name).read_bytes(), name


@pytest.mark.timeout(300)
def test_language_id_labels_on_ray_equal_the_local_ones(embedded_local, ray_settings, tmp_path):
    """language_id_table on the cluster: the same labels, scores, thresholds and verdicts per document."""
    from mmbert_dagster.data import langid
    from mmbert_dagster.recipe import LanguageIdConfig

    files, _, _ = embedded_local
    settings, _ = ray_settings
    docs_file = files[0].parent.parent / "local" / "docs.parquet"
    docs = pl.scan_parquet(docs_file)
    cfg = LanguageIdConfig(epochs=5, dim=16, buckets=20_000)
    (tmp_path / "model").mkdir()
    langid.build_model(docs, tmp_path / "model", cfg, seed=1, log=lambda _: None, warn=lambda _: None)
    tables = {}
    for kind, executor in (("local", None), ("ray", settings)):
        (tmp_path / kind).mkdir()
        lines = []
        langid.build_table(tmp_path / "model", docs, tmp_path / kind, log=lines.append, warn=lambda _: None,
                           docs_files=[docs_file], executor=executor, work_dir=tmp_path / "work", tasks=2)
        tables[kind] = pl.read_parquet(langid.table_file(tmp_path / kind))
        if kind == "ray":
            assert any("language-id: task" in ln and " done, " in ln for ln in lines), lines
    assert tables["local"].height == pl.read_parquet(docs_file).height
    assert tables["ray"].equals(tables["local"])


@pytest.mark.timeout(180)
def test_ray_failure_names_rank_and_log(corpus, ray_settings, tmp_path):
    settings, _ = ray_settings
    logs = tmp_path / "logs"
    with pytest.raises(DataExecutorError) as err:
        run_pipeline(_filter_pipeline(corpus, tmp_path / "out", fail_rank=2), settings, tasks=TASKS,
                     logging_dir=logs, name="filter", log=lambda _: None)
    assert err.value.failed == [2] and err.value.name == "filter"
    log_file = logs / "logs" / "task_00002.log"
    assert err.value.logs[2] == [str(log_file)] and "boom on rank 2" in log_file.read_text()
    assert "rank 2" in str(err.value) and "ValueError: boom on rank 2" in str(err.value)
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001", "00003"]


# --------------------------------------------------------------------------------------------------------------
# Slurm (stand-in commands)

def _parquet_pipeline(inp: Path, out: Path, counter: Path, fail_rank: int | None = None) -> list:
    """datatrove's own steps (reader, lambda filter, writer) around the test's steps."""
    from datatrove.pipeline.filters import LambdaFilter
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter

    steps = [ParquetReader(str(inp)), LambdaFilter(lambda doc: len(doc.text) >= 40), CountRuns(str(counter))]
    if fail_rank is not None:
        steps.append(FailOnRank(fail_rank))
    return steps + [ParquetWriter(str(out), output_filename="${rank}.parquet")]


def _small_corpus(folder: Path) -> dict[str, str]:
    folder.mkdir()
    rng = random.Random(3)
    kept = {}
    for part in range(TASKS):  # datatrove's readers give task r the r-th file
        rows = []
        for i in range(10):
            text = " ".join(rng.sample(SENTENCES, rng.randint(0, 2))) or "short"
            rows.append({"id": f"p{part}-{i}", "text": text})
            if len(text) >= 40:
                kept[rows[-1]["id"]] = text
        pl.DataFrame(rows).write_parquet(folder / f"{part}.parquet")
    return kept


def _small_out(out: Path) -> dict[str, str]:
    df = pl.read_parquet(sorted(out.glob("*.parquet")))
    return dict(zip(df["id"], df["text"]))


def _fake_state(root: Path, job_id: str) -> dict[int, str]:
    job = root / "jobs" / job_id
    meta = json.loads((job / "meta.json").read_text())
    return {i: (job / f"{i}.state").read_text().strip() if (job / f"{i}.state").is_file() else "PENDING"
            for i in meta["array"]}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, root = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    for cmd in ("sbatch", "squeue", "sacct", "scancel", "scontrol", "srun"):
        (bin_dir / cmd).write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SLURM}" {cmd} "$@"\n')
        (bin_dir / cmd).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(tmp_path)
    yield root
    for pid_file in root.glob("jobs/*/runner.pid"):  # stop runners the test left (their own process groups)
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError, PermissionError):
            pass


def _wait_fake_job(root: Path, job_id: str, timeout: float = 60) -> dict[int, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = _fake_state(root, job_id)
        if all(s in ("COMPLETED", "FAILED", "CANCELLED") for s in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(f"fake Slurm job {job_id} still {states}")


@pytest.mark.timeout(120)
def test_slurm_waits_for_arrays(fake_slurm, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_NO_SACCT", "1")  # no accounting: the wait falls back to squeue
    expected = _small_corpus(tmp_path / "in")
    settings = DataExecutorSettings(kind="slurm", partition="debug", time="00:10:00", cpus_per_task=2,
                                    mem_per_cpu_gb=1.5, sbatch_args={"account": "proj"}, workers=2,
                                    max_array_size=3, poll_seconds=0.3)
    logs, lines = tmp_path / "logs", []
    summary = run_pipeline(_parquet_pipeline(tmp_path / "in", tmp_path / "out", tmp_path / "runs"), settings,
                           tasks=TASKS, logging_dir=logs, name="slurm_ok", log=lines.append)
    # the wait returned once every task had finished
    assert summary["completed"] == TASKS and summary["kind"] == "slurm"
    assert sorted(p.name for p in (logs / "completions").iterdir()) == [f"{r:05d}" for r in range(TASKS)]
    assert len(summary["job_ids"]) == 2  # 4 tasks, at most 3 per array
    for job_id in summary["job_ids"]:  # datatrove submits the same 0-2 array twice (RUN_OFFSET 0, 1)
        assert _fake_state(fake_slurm, job_id) == {i: "COMPLETED" for i in range(3)}
    assert _small_out(tmp_path / "out") == expected and _runs(tmp_path / "runs") == {r: 1 for r in range(TASKS)}
    assert sum(" done, " in ln for ln in lines) == TASKS and any("submitted Slurm job(s)" in ln for ln in lines)
    script = (logs / "launch_script.slurm").read_text()
    for directive in ("--partition=debug", "--time=00:10:00", "--cpus-per-task=2", "--mem-per-cpu=1536M",
                      "--account=proj", "--array=0-2%2", "--job-name=mmbert-slurm_ok",
                      f"--output={logs / 'slurm_logs' / '%A_%a.out'}"):
        assert f"#SBATCH {directive}\n" in script, (directive, script)
    assert "qos" not in script and f"source {sys.prefix}/bin/activate" in script
    assert (logs / "slurm_logs" / f"{summary['job_ids'][0]}_0.out").is_file()
    merge_id = summary["merge_job_id"]  # datatrove's merge_stats job, after the arrays
    assert _wait_fake_job(fake_slurm, merge_id) == {0: "COMPLETED"} and (logs / "stats.json").is_file()


@pytest.mark.timeout(120)
def test_slurm_failure_names_rank_then_resume(fake_slurm, tmp_path):
    expected = _small_corpus(tmp_path / "in")
    settings = DataExecutorSettings(kind="slurm", partition="debug", poll_seconds=0.3)
    logs, counter = tmp_path / "logs", tmp_path / "runs"
    with pytest.raises(DataExecutorError) as err:
        run_pipeline(_parquet_pipeline(tmp_path / "in", tmp_path / "out", counter, fail_rank=2), settings,
                     tasks=TASKS, logging_dir=logs, name="slurm_fail", log=lambda _: None)
    assert err.value.failed == [2]
    job_id = "1000"
    message = str(err.value)
    for part in ("rank 2", f"Slurm {job_id}_2 FAILED", "ValueError: boom on rank 2",
                 str(logs / "logs" / "task_00002.log"), str(logs / "slurm_logs" / f"{job_id}_2.out")):
        assert part in message, (part, message)
    assert err.value.logs[2] == [str(logs / "logs" / "task_00002.log"), str(logs / "slurm_logs" / f"{job_id}_2.out")]
    assert _fake_state(fake_slurm, job_id) == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED", 3: "COMPLETED"}
    assert _fake_state(fake_slurm, "1001") == {0: "CANCELLED"}  # merge_stats (afterok) could never run
    # rerun (the bug fixed): only rank 2 is submitted
    summary = run_pipeline(_parquet_pipeline(tmp_path / "in", tmp_path / "out", counter), settings, tasks=TASKS,
                           logging_dir=logs, name="slurm_fail", log=lambda _: None)
    assert summary["skipped"] == 3 and summary["completed"] == TASKS and summary["job_ids"] == ["1002"]
    assert "#SBATCH --array=0-0\n" in (logs / "launch_script.slurm").read_text()
    assert _runs(counter) == {0: 1, 1: 1, 2: 2, 3: 1}
    assert _small_out(tmp_path / "out") == expected
    _wait_fake_job(fake_slurm, "1003")


def test_slurm_without_sbatch(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    settings = DataExecutorSettings(kind="slurm", partition="debug")
    with pytest.raises(DataExecutorError, match="sbatch"):
        run_pipeline([CountRuns(str(tmp_path / "runs"))], settings, tasks=1, logging_dir=tmp_path / "logs",
                     name="x", log=lambda _: None)


# --------------------------------------------------------------------------------------------------------------
# Settings

def test_settings_from_env():
    s = settings_from_env({})
    assert s == DataExecutorSettings() and s.kind == "local"
    env = {"MMBERT_DATA_EXECUTOR": "Slurm", "MMBERT_DATA_WORKERS": "8", "MMBERT_DATA_CPUS_PER_TASK": "4",
           "MMBERT_DATA_MEM_PER_CPU_GB": "3.5", "MMBERT_SLURM_PARTITION": "cpu", "MMBERT_SLURM_TIME": "1-00:00:00",
           "MMBERT_SLURM_QOS": "high", "MMBERT_SLURM_ENV_COMMAND": "source /opt/venv/bin/activate",
           "MMBERT_SLURM_SBATCH_ARGS": "account=proj, exclusive=", "MMBERT_SLURM_JOB_NAME_PREFIX": "x-",
           "MMBERT_SLURM_POLL_SECONDS": "2.5", "MMBERT_SLURM_MAX_ARRAY_SIZE": "500", "MMBERT_HOME": "/elsewhere"}
    s = settings_from_env(env)
    assert (s.kind, s.workers, s.cpus_per_task, s.mem_per_cpu_gb, s.partition, s.time, s.qos) == (
        "slurm", 8, 4, 3.5, "cpu", "1-00:00:00", "high")
    assert s.sbatch_args == {"account": "proj", "exclusive": ""} and s.env_command == "source /opt/venv/bin/activate"
    assert (s.job_name_prefix, s.poll_seconds, s.max_array_size) == ("x-", 2.5, 500)
    assert settings_from_env({**env, "MMBERT_SLURM_SBATCH_ARGS": '{"account": "a", "gres": "gpu:1"}'}).sbatch_args == {
        "account": "a", "gres": "gpu:1"}
    assert settings_from_env(env, partition="gpu", workers=2).partition == "gpu"  # overrides win
    ray = settings_from_env({"MMBERT_DATA_EXECUTOR": "ray", "MMBERT_RAY_ADDRESS": "ray://head:10001",
                             "MMBERT_RAY_SHIP_CODE": "0", "MMBERT_RAY_NUM_CPUS": "", "MMBERT_DATA_WORKERS": " "})
    assert (ray.kind, ray.ray_address, ray.ray_ship_code, ray.ray_num_cpus, ray.workers) == (
        "ray", "ray://head:10001", False, 0, 0)
    assert settings_from_env({"MMBERT_DATA_EXECUTOR": "ray", "MMBERT_RAY_ADDRESS": "10.0.0.1:6379"}).ray_address
    assert hash(s) == hash(settings_from_env(env))


@pytest.mark.parametrize("env, message", [
    ({"MMBERT_DATA_EXECUTOR": "kubernetes"}, "MMBERT_DATA_EXECUTOR: DataExecutorSettings.kind"),
    ({"MMBERT_DATA_WORKERS": "many"}, "MMBERT_DATA_WORKERS='many'"),
    ({"MMBERT_DATA_WORKERS": "-1"}, "MMBERT_DATA_WORKERS: DataExecutorSettings.workers"),
    ({"MMBERT_DATA_EXECUTOR": "slurm"}, "MMBERT_SLURM_PARTITION"),
    ({"MMBERT_DATA_EXECUTOR": "slurm", "MMBERT_SLURM_PARTITION": "cpu", "MMBERT_SLURM_TIME": "1 hour"},
     "MMBERT_SLURM_TIME: DataExecutorSettings.time"),
    ({"MMBERT_SLURM_PARTITON": "cpu"}, "unknown environment variable(s) ['MMBERT_SLURM_PARTITON']"),
    ({"MMBERT_RAY_ADDRESS": "head node"}, "DataExecutorSettings.ray_address"),
    ({"MMBERT_RAY_SHIP_CODE": "maybe"}, "MMBERT_RAY_SHIP_CODE='maybe'"),
    ({"MMBERT_SLURM_SBATCH_ARGS": "account"}, "MMBERT_SLURM_SBATCH_ARGS='account'"),
    ({"MMBERT_SLURM_SBATCH_ARGS": "[1]"}, "MMBERT_SLURM_SBATCH_ARGS"),
    ({"MMBERT_SLURM_POLL_SECONDS": "0"}, "DataExecutorSettings.poll_seconds"),
    ({"MMBERT_DATA_CPUS_PER_TASK": "0"}, "DataExecutorSettings.cpus_per_task"),
])
def test_settings_from_env_errors(env, message):
    with pytest.raises(ValueError) as err:
        settings_from_env(env)
    assert message in str(err.value), str(err.value)


def test_settings_validation():
    with pytest.raises(ValueError, match="DataExecutorSettings.cpus_per_task.*ray_num_cpus = 2"):
        DataExecutorSettings(kind="ray", ray_num_cpus=2, cpus_per_task=4)
    with pytest.raises(ValueError, match="DataExecutorSettings.sbatch_args"):
        DataExecutorSettings(sbatch_args={"--account": "x"})
    with pytest.raises(ValueError, match="DataExecutorSettings.mem_per_cpu_gb"):
        DataExecutorSettings(kind="slurm", partition="p", mem_per_cpu_gb=0)
    with pytest.raises(ValueError, match="DataExecutorSettings.workers"):
        DataExecutorSettings(workers=True)
    with pytest.raises(ValueError, match="unknown setting"):
        settings_from_env({}, partitoin="x")
    with pytest.raises(ValueError, match="tasks"):
        executors.make_executor([], DataExecutorSettings(), tasks=0, logging_dir="x", name="x")
    assert DataExecutorSettings(kind="slurm", partition="p", time="30").time == "30"
