"""Dagster resources: everything that touches the outside world (artifact store, data sources, external models,
compute), with environment-based defaults chosen in one place (`default_resources`)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Literal

from dagster import ConfigurableResource

from mmbert_dagster import artifacts
from mmbert_dagster.data import sources
from mmbert_dagster.recipe import active_recipe


class ArtifactStore(ConfigurableResource):
    """The artifact root: every asset owns ``<root>/<recipe name>/<asset_key>/``, written atomically.

    The recipe is the process's (``MMBERT_PRESET``, the one the asset graph was built from), so artifacts always
    land in the folder of the recipe the assets compute with.
    """

    root: str = ""  # empty: $MMBERT_HOME, else ./.mmbert in the working directory

    def layout(self) -> artifacts.ArtifactLayout:
        root = Path(self.root).expanduser().resolve() if self.root else artifacts.mmbert_home()
        return artifacts.ArtifactLayout(root, active_recipe().name)

    def path(self, key: str) -> Path:
        return self.layout().artifact(key)

    def work_dir(self, key: str) -> Path:
        """Scratch folder of asset ``key`` that survives a killed run (resume state, executor logs)."""
        return self.layout().work(key)

    def cache_dir(self, name: str) -> Path:
        """A download cache under the artifact root, shared by every recipe (``<root>/.cache/<name>``)."""
        return self.layout().cache(name)

    def require(self, key: str) -> Path:
        """The folder of an upstream artifact, verified complete and uncorrupted."""
        folder = self.path(key)
        artifacts.verify_artifact(folder, key)
        return folder

    def write(self, key: str, extra_manifest: dict | None = None) -> AbstractContextManager[Path]:
        """A temporary folder that becomes ``path(key)`` when the block completes without error."""
        artifacts.clean_stale_temporaries(self.path(key).parent, key)
        return artifacts.atomic_dir(self.path(key), extra_manifest)


class CorpusSource(ConfigurableResource):
    """Where ``raw_corpus`` reads documents from.

    - ``embedded`` (default): the multilingual sample shipped in the package (offline).
    - ``local``: JSONL / Parquet / plain-text files or globs in ``paths``; ``lang_field`` names an optional
      per-record language column (ISO 639-3 + script); ``on_bad_record`` = error | skip.
    - ``huggingface``: FineWeb-2-style per-language subsets (``hf_configs`` such as ``deu_Latn``) streamed with
      `datasets` (needs the network; unset HF_HUB_OFFLINE). ``hf_dataset`` may be a local folder in the same layout.
    ``heldout_path``: a parquet of held-out evaluation text (doc_id, source, declared_lang, article, text) for
    non-embedded sources; the embedded source ships its own.
    ``replay_paths``: a second, local source read after the first with the same field settings — text of the
    languages a released checkpoint already knows, for a late decay's replay share (stage ``replay_share`` and
    ``replay_languages``; the ``extend`` preset). With ``huggingface``, known languages can simply be more
    ``hf_configs``.
    """

    kind: Literal["embedded", "local", "huggingface"] = "embedded"
    paths: list[str] = []
    text_field: str = "text"
    lang_field: str | None = None
    default_lang: str = sources.UNKNOWN_LANG
    id_field: str | None = None
    on_bad_record: Literal["error", "skip"] = "error"
    hf_dataset: str = "HuggingFaceFW/fineweb-2"
    hf_configs: list[str] = []
    hf_split: str = "train"
    max_docs_per_config: int | None = None
    heldout_path: str = ""
    replay_paths: list[str] = []

    def documents(self, log: Callable[[str], None], skips: sources.SkipCounter) -> Iterator[dict]:
        main = self._main_documents(log, skips)
        if not self.replay_paths:
            return main
        log(f"corpus: then the replay source {self.replay_paths}")
        return itertools.chain(main, self._local(self.replay_paths, log, skips))

    def _local(self, paths: list[str], log: Callable[[str], None], skips: sources.SkipCounter) -> Iterator[dict]:
        return sources.iter_local_files(
            paths, text_field=self.text_field, lang_field=self.lang_field, default_lang=self.default_lang,
            id_field=self.id_field, on_bad_record=self.on_bad_record, skips=skips, log=log,
        )

    def _main_documents(self, log: Callable[[str], None], skips: sources.SkipCounter) -> Iterator[dict]:
        if self.kind == "embedded":
            return sources.iter_embedded(log)
        if self.kind == "local":
            if not self.paths:
                raise sources.SourceError("corpus source 'local' needs `paths` (files, folders or globs)")
            return self._local(self.paths, log, skips)
        return sources.iter_huggingface(
            self.hf_dataset, self.hf_configs, split=self.hf_split, text_field=self.text_field,
            max_docs_per_config=self.max_docs_per_config, log=log,
        )

    def heldout(self) -> Path | None:
        if self.kind == "embedded":
            return sources.embedded_heldout()
        if self.heldout_path:
            path = Path(self.heldout_path).expanduser()
            if not path.is_file():
                raise sources.SourceError(f"{self.heldout_path}: held-out file does not exist (heldout_path)")
            return path
        return None


class ExternalModels(ConfigurableResource):
    """User-supplied models that replace trained ones (empty = use the recipe's setting, else train our own)."""

    lid_model_path: str = ""  # a fastText language-ID model, e.g. GlotLID's model.bin
    tokenizer_path: str = ""  # a tokenizer.json file or Hugging Face tokenizer folder, e.g. Gemma-2's


class Compute(ConfigurableResource):
    """Where work runs: CPU processes for the data half; device and torchrun processes for training."""

    data_workers: int = 1  # datatrove tasks run at once (local); the number of tasks on a Ray or Slurm cluster
    data_executor: Literal["local", "ray", "slurm"] = "local"  # where the data half's datatrove pipelines run
    # (data/executors.py; env MMBERT_DATA_EXECUTOR): this machine, a Ray cluster, or Slurm job arrays
    data_cpus_per_task: int = 1  # Ray and Slurm: CPUs reserved per datatrove task
    data_mem_per_cpu_gb: float = 2.0  # Ray and Slurm: memory per CPU (GB)
    ray_address: str = ""  # "": start Ray on this machine; "auto", "host:port", "ray://host:port": connect
    ray_num_cpus: int = 0  # CPUs of a Ray instance started here (0: all)
    slurm_partition: str = ""  # required for slurm
    slurm_time: str = "01:00:00"  # time limit per array task
    slurm_qos: str = ""
    slurm_env_command: str = ""  # run before each task, e.g. "source /shared/venv/bin/activate" ("": this venv)
    slurm_sbatch_args: dict[str, str] = {}  # more #SBATCH options, e.g. {"account": "proj"}
    device: str = "auto"  # auto | cpu | cuda
    nproc_per_node: int = 1  # torchrun processes per node for training assets (one per GPU)
    nnodes: int = 1  # nodes of a multi-node training run (each runs torchrun; they meet at rdzv_endpoint)
    rdzv_endpoint: str = ""  # host:port of torchrun's c10d rendezvous, reachable from every node (nnodes > 1)
    launch_prefix: list[str] = []  # starts torchrun on every node, e.g. ["srun", "--nodes=4", "--ntasks-per-node=1"]
    checkpoint_every: int = 25  # optimizer steps between resume checkpoints of a training stage
    micro_batch_tokens: int = 0  # tokens per micro-batch and process; 0: the device's default (train/device.py)
    reuse_checkpoints: bool = False  # a stage whose committed checkpoint was trained from the same inputs and code
    # version is not trained again (training is deterministic); `make repro` sets it (MMBERT_REUSE_CHECKPOINTS=1)

    def data_settings(self):
        """Where the datatrove pipelines run (mmbert_dagster.data.executors.DataExecutorSettings)."""
        from mmbert_dagster.data.executors import DataExecutorSettings

        return DataExecutorSettings(workers=self.data_workers,
                                    **{setting: getattr(self, field) for field, setting in _DATA_SETTINGS.items()})

    def train_settings(self):
        """Where and how a training stage runs (mmbert_dagster.train.stage_run.TrainSettings)."""
        from mmbert_dagster.train.distributed import Launcher
        from mmbert_dagster.train.stage_run import TrainSettings

        launcher = Launcher(nproc_per_node=self.nproc_per_node, nnodes=self.nnodes, rdzv_endpoint=self.rdzv_endpoint,
                            prefix=tuple(self.launch_prefix))
        return TrainSettings(device=self.device, micro_batch_tokens=self.micro_batch_tokens,
                             checkpoint_every=self.checkpoint_every, launcher=launcher)


# Compute field -> the DataExecutorSettings field it sets (data_workers is the settings' `workers`)
_DATA_SETTINGS = {"data_executor": "kind", "data_cpus_per_task": "cpus_per_task",
                  "data_mem_per_cpu_gb": "mem_per_cpu_gb", "ray_address": "ray_address", "ray_num_cpus": "ray_num_cpus",
                  "slurm_partition": "partition", "slurm_time": "time", "slurm_qos": "qos",
                  "slurm_env_command": "env_command", "slurm_sbatch_args": "sbatch_args"}


def _data_executor_from_env() -> dict:
    """The Compute fields the MMBERT_DATA_EXECUTOR / MMBERT_RAY_* / MMBERT_SLURM_* variables set
    (data/executors.py's table; a malformed value is an error naming the variable)."""
    from mmbert_dagster.data.executors import settings_from_env

    env = settings_from_env(workers=1)  # the worker count stays MMBERT_DATA_WORKERS' (above)
    fields = {field: getattr(env, setting) for field, setting in _DATA_SETTINGS.items()}
    return fields | {"slurm_sbatch_args": {k: str(v) for k, v in env.sbatch_args.items()}}


def default_resources() -> dict:
    """The one place where environment-based defaults are chosen (local, CI or cluster via env vars)."""
    return {
        "store": ArtifactStore(),
        "corpus": CorpusSource(),
        "external_models": ExternalModels(),
        "compute": Compute(data_workers=int(os.environ.get("MMBERT_DATA_WORKERS", min(4, os.cpu_count() or 1))),
                           reuse_checkpoints=os.environ.get("MMBERT_REUSE_CHECKPOINTS", "") in ("1", "true", "yes"),
                           **_data_executor_from_env()),
    }
