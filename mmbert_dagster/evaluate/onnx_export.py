"""A checkpoint as an ONNX masked-LM for serving, with its parity to PyTorch and the CPU speed-up it gives.

:func:`export_onnx` writes ``model.onnx`` (``input_ids``, ``attention_mask`` -> ``logits``; int64 inputs, batch
and sequence axes dynamic) beside the checkpoint's ``config.json`` and tokenizer files: the layout optimum's
``ORTModelForMaskedLM`` loads, and enough for plain onnxruntime + ``tokenizers``. The graph is transformers' own
padded ModernBERT (``attn="sdpa"``; our packed attention has no ONNX form): global layers attend to every
non-padding token, local ones within ``|i - j| <= local_attention / 2``, both masks computed in the graph from
``attention_mask`` and the sequence length. A folder that is not a ModernBERT checkpoint (no ``config.json``,
another ``model_type``, missing or corrupt ``model.safetensors``, no ``tokenizer.json``) is refused with one
:class:`OnnxExportError` before any export work; the export goes to a temporary sibling folder renamed into place,
so ``out_dir`` is either complete or absent.

:func:`parity` runs PyTorch (fp32, eval) and onnxruntime (``CPUExecutionProvider``) on the same padded batches of
texts and compares the logits at non-padding positions: an export is good when ``max_abs_diff <= TOLERANCE``
(1e-3). :func:`throughput` times both, alternating on the same padded batches with the same thread count, and
reports non-padding tokens/s of each and the ratio onnxruntime / PyTorch.

Texts are tokenized with the checkpoint's tokenizer (its padding / truncation settings switched off), cut to
``max_length`` keeping the closing ``[SEP]`` when the text ends with one, right-padded with the pad id.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from mmbert_dagster.train.export import CONFIG_FILE, WEIGHTS_FILE

ONNX_FILE = "model.onnx"  # the name optimum's ORTModel looks for
REPORT_JSON = "onnx_report.json"  # deploy(): export, parity and throughput of the onnx_model asset
TOKENIZER_FILE = "tokenizer.json"
# copied beside model.onnx when present (no weights, no README / training records)
COPIED_FILES = (CONFIG_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.14 runs it
TOLERANCE = 1e-3  # max |logit difference| PyTorch vs onnxruntime an export must stay within
ATTN = "sdpa"  # transformers' padded attention: exportable, unlike our packed one ("auto")
DEFAULT_MAX_LENGTH = 512


class OnnxExportError(ValueError):
    """A checkpoint folder that cannot be exported (or an export that failed); names the folder and the problem."""


# --------------------------------------------------------------------------------------------------------------
# the checkpoint

def check_checkpoint(folder: Path | str) -> dict:
    """The ``config.json`` of an exportable ModernBERT folder; :class:`OnnxExportError` naming what is wrong.

    Reads files only (no torch): config, the safetensors header of every weights file (a truncated file fails
    here), the tokenizer.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OnnxExportError(f"{folder}: not a folder (expected a Hugging Face ModernBERT checkpoint)")
    if not (folder / CONFIG_FILE).is_file():
        raise OnnxExportError(f"{folder}: lacks {CONFIG_FILE} — not a Hugging Face model folder")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OnnxExportError(f"{folder}: {CONFIG_FILE} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or config.get("model_type") != "modernbert":
        got = config.get("model_type") if isinstance(config, dict) else None
        raise OnnxExportError(f"{folder}: {CONFIG_FILE} has model_type = {got!r}; only ModernBERT checkpoints "
                              f"(model_type 'modernbert') are exported")
    for shard in _weight_files(folder):
        try:
            from safetensors import safe_open

            with safe_open(str(shard), framework="numpy") as f:
                if not list(f.keys()):
                    raise OnnxExportError(f"{folder}: {shard.name} holds no tensors")
        except OnnxExportError:
            raise
        except Exception as e:  # SafetensorError: a truncated or overwritten file
            raise OnnxExportError(f"{folder}: {shard.name} is corrupt or truncated: {e}") from e
    try:
        from mmbert_dagster.data.tokenizer import load_tokenizer

        load_tokenizer(folder)
    except Exception as e:
        raise OnnxExportError(f"{folder}: no usable tokenizer ({TOKENIZER_FILE}): {e}") from e
    return config


def _weight_files(folder: Path) -> list[Path]:
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if not index.is_file():
        raise OnnxExportError(f"{folder}: lacks {WEIGHTS_FILE} — a checkpoint folder holds its weights as safetensors")
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OnnxExportError(f"{folder}: {index.name} is not a safetensors index: {e}") from e
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise OnnxExportError(f"{folder}: lacks weight shard(s) {', '.join(missing)} named by {index.name}")
    return [folder / s for s in shards]


def _load_model(folder: Path):
    """The checkpoint in fp32, eval mode, with transformers' SDPA attention; refuses weights that do not fit."""
    import torch
    from transformers import ModernBertForMaskedLM

    try:
        # load_model's call (mmbert_dagster.train.model) plus output_loading_info: a weights file lacking tensors
        # would otherwise load silently with those tensors randomly initialised
        model, info = ModernBertForMaskedLM.from_pretrained(
            str(folder), attn_implementation=ATTN, dtype=torch.float32, local_files_only=True,
            output_loading_info=True)
    except Exception as e:
        raise OnnxExportError(f"{folder}: the checkpoint does not load as a ModernBertForMaskedLM: "
                              f"{type(e).__name__}: {e}") from e
    bad = sorted(info.get("missing_keys") or ()) + sorted(info.get("mismatched_keys") or ())
    if bad:
        raise OnnxExportError(f"{folder}: {WEIGHTS_FILE} lacks or mis-shapes {len(bad)} tensor(s) of the model "
                              f"config.json describes, e.g. {bad[:3]}")
    return model.eval()


class _Tokens:
    """The checkpoint's tokenizer with the ids padding and truncation need."""

    def __init__(self, folder: Path, config: dict):
        from mmbert_dagster.data.tokenizer import load_tokenizer, special_token_ids

        self.tok = load_tokenizer(folder)
        self.tok.no_padding()  # a foreign tokenizer.json may carry its own; the batches here are made explicitly
        self.tok.no_truncation()
        try:
            specials = special_token_ids(folder)
        except Exception:  # unreadable tokenizer_config.json: the model's ids below
            specials = {}
        pad = specials.get("pad", config.get("pad_token_id"))
        if pad is None:
            raise OnnxExportError(f"{folder}: neither the tokenizer nor {CONFIG_FILE} names a pad token id")
        self.pad = int(pad)
        sep = specials.get("sep", config.get("sep_token_id"))
        self.sep = None if sep is None else int(sep)

    def batches(self, texts: Sequence[str], max_length: int, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input_ids, attention_mask), int64 (b, longest in batch), for consecutive groups of ``batch_size``."""
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
        docs = []
        for i, enc in enumerate(self.tok.encode_batch(list(texts))):
            ids = list(enc.ids)
            if not ids:
                raise ValueError(f"text {i} ({texts[i][:40]!r}) tokenizes to no tokens")
            if len(ids) > max_length:
                keep_sep = max_length > 1 and self.sep is not None and ids[-1] == self.sep
                ids = ids[: max_length - 1] + ids[-1:] if keep_sep else ids[:max_length]
            docs.append(ids)
        out = []
        for start in range(0, len(docs), batch_size):
            group = docs[start:start + batch_size]
            width = max(len(d) for d in group)
            ids = np.full((len(group), width), self.pad, dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for r, d in enumerate(group):
                ids[r, :len(d)] = d
                mask[r, :len(d)] = 1
            out.append((ids, mask))
        return out


def encode_batches(folder: Path | str, texts: Sequence[str], *, max_length: int = DEFAULT_MAX_LENGTH,
                   batch_size: int = 8) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ``(input_ids, attention_mask)`` int64 batches :func:`parity` and :func:`throughput` feed both engines
    (and an onnxruntime caller can feed ``model.onnx``): consecutive groups of ``batch_size`` texts, each cut to
    ``max_length`` (at most ``max_position_embeddings``) keeping a closing ``[SEP]``, right-padded."""
    folder = Path(folder)
    config = check_checkpoint(folder)
    return _Tokens(folder, config).batches(texts, _max_length(config, max_length), batch_size)


def _session(onnx_dir: Path, threads: int | None = None):
    import onnxruntime as ort

    path = Path(onnx_dir) / ONNX_FILE
    if not path.is_file():
        raise OnnxExportError(f"{onnx_dir}: lacks {ONNX_FILE} — not an export_onnx output folder")
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # idle worker threads would otherwise spin after each run and steal the cores PyTorch is timed on
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _max_length(config: dict, max_length: int) -> int:
    return min(int(max_length), int(config.get("max_position_embeddings") or max_length))


# --------------------------------------------------------------------------------------------------------------
# export

def _logits_module(model):
    """``(input_ids, attention_mask) -> logits``: the MLM with a plain tensor output (no ModelOutput in the graph)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, mlm):
            super().__init__()
            self.mlm = mlm

        def forward(self, input_ids, attention_mask):
            return self.mlm(input_ids=input_ids, attention_mask=attention_mask).logits

    return Logits(model).eval()


def _example(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """A 2-row example batch, longer than the local window, the second row padded: the inputs the graph is for.

    (transformers already skips its "no mask needed" shortcut for unpadded short inputs while tracing; this keeps
    the traced path the padded, windowed one even if that guard changes.)"""
    window = int(config.get("local_attention") or 128)
    length = max(2, min(window + 8, int(config.get("max_position_embeddings") or window + 8)))
    vocab = int(config.get("vocab_size") or 2)
    ids = (np.arange(2 * length, dtype=np.int64).reshape(2, length) % vocab)
    mask = np.ones((2, length), dtype=np.int64)
    mask[1, length - max(1, length // 4):] = 0
    ids[mask == 0] = int(config.get("pad_token_id") or 0)
    return ids, mask


def export_onnx(folder: Path | str, out_dir: Path | str, *, opset: int = DEFAULT_OPSET,
                log: Callable[[str], None] = print) -> dict:
    """``out_dir/model.onnx`` + ``config.json`` + tokenizer files from a ModernBERT checkpoint folder.

    Returns ``{"opset", "size_bytes" (the ONNX graph and any external-data files), "seconds", "exporter",
    "example_shape" (the traced batch; other shapes run through the dynamic axes), "files"}``.
    """
    import torch

    folder, out_dir = Path(folder), Path(out_dir)
    config = check_checkpoint(folder)
    model = _load_model(folder)
    t0 = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        ids, mask = _example(config)
        axes = {"batch", "sequence"}
        dynamic = {name: {0: "batch", 1: "sequence"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
        with warnings.catch_warnings(), torch.no_grad():
            # transformers' mask code branches in Python on shapes (padding the 2D mask to kv length, the SDPA
            # is_causal flag); with a mask always given, the traced branch is the one every shape takes — checked
            # by parity() on other batch sizes and lengths. The exporter's own deprecation notice is not news.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="The feature will be removed")
            # the only advanced indexing is the padding mask's padding_mask[batch_arange, kv_arange]: never negative
            warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
            # torch 2.13's default exporter (dynamo=True, torch.export-based) needs the onnxscript package, which
            # is neither installed nor a dependency here: it fails with "ModuleNotFoundError: No module named
            # 'onnxscript'". The TorchScript exporter needs only torch, traces ModernBERT with SDPA cleanly and
            # keeps both axes dynamic (parity 1e-7 at other shapes).
            torch.onnx.export(
                _logits_module(model), (torch.from_numpy(ids), torch.from_numpy(mask)), str(tmp / ONNX_FILE),
                dynamo=False, opset_version=int(opset), input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME], dynamic_axes=dynamic, do_constant_folding=True)
        import onnx

        onnx.checker.check_model(str(tmp / ONNX_FILE))  # by path: also for > 2 GB graphs with external data
        graph = onnx.load(str(tmp / ONNX_FILE), load_external_data=False).graph
        for value in (*graph.input, *graph.output):
            dims = {d.dim_param for d in value.type.tensor_type.shape.dim[:2]}
            if dims != axes:
                raise OnnxExportError(f"{folder}: the exported {value.name} has axes {dims}, not dynamic {axes}")
        size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        copied = []
        for name in COPIED_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, tmp / name)
                copied.append(name)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            old.rename(out_dir)
        if isinstance(e, OnnxExportError):
            raise
        raise OnnxExportError(f"{folder}: ONNX export failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    log(f"{folder}: ONNX (opset {opset}, TorchScript exporter) -> {out_dir / ONNX_FILE}, "
        f"{size / 1e6:.1f} MB in {seconds:.1f} s")
    return {"opset": int(opset), "size_bytes": int(size), "seconds": round(seconds, 3), "exporter": "torchscript",
            "example_shape": list(ids.shape), "files": sorted([ONNX_FILE, *copied])}


# --------------------------------------------------------------------------------------------------------------
# checks

def parity(folder: Path | str, onnx_dir: Path | str, texts: Sequence[str], *, max_length: int = 256,
           batch_size: int = 4) -> dict:
    """Logits of PyTorch (fp32) and onnxruntime on the same padded batches, at the non-padding positions.

    ``{"max_abs_diff", "mean_abs_diff", "n_tokens", "n_texts", "batches", "tolerance", "ok"}``; ``ok`` is
    ``max_abs_diff <= TOLERANCE``. Batches of ``batch_size`` texts bound the memory (a batch holds
    ``batch x length x vocab`` logits twice).
    """
    import torch

    folder = Path(folder)
    config = check_checkpoint(folder)
    model = _load_model(folder)
    batches = _Tokens(folder, config).batches(texts, _max_length(config, max_length), batch_size)
    session = _session(Path(onnx_dir))
    worst, total, n = 0.0, 0.0, 0
    for ids, mask in batches:
        with torch.inference_mode():
            ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
        got = session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]
        diff = np.abs(ref - got)[mask.astype(bool)]
        if not np.isfinite(diff).all():
            worst = float("inf")
        else:
            worst = max(worst, float(diff.max()))
        total += float(diff.sum(dtype=np.float64))
        n += int(mask.sum())
    n_logits = n * int(config.get("vocab_size") or 1)
    return {"max_abs_diff": worst, "mean_abs_diff": total / n_logits if n_logits else 0.0, "n_tokens": n,
            "n_texts": len(texts), "batches": len(batches), "tolerance": TOLERANCE, "ok": worst <= TOLERANCE}


def throughput(folder: Path | str, onnx_dir: Path | str, texts: Sequence[str], *, batch_size: int = 8,
               repeats: int = 3, threads: int | None = None, max_length: int = DEFAULT_MAX_LENGTH) -> dict:
    """Non-padding tokens/s to logits, onnxruntime vs PyTorch on CPU, timed side by side on the same batches.

    Both get ``threads`` intra-op threads (default: PyTorch's current count; restored afterwards) and one
    warm-up pass over every batch; then, ``repeats`` times, each batch runs once per engine, the order
    alternating between repeats. ``{"ort_tokens_per_s", "torch_tokens_per_s", "ratio" (ort / torch), "threads",
    "tokens" (per engine), "ort_seconds", "torch_seconds", "batches", "repeats"}``.
    """
    import torch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    folder = Path(folder)
    config = check_checkpoint(folder)
    model = _load_model(folder)
    batches = _Tokens(folder, config).batches(texts, _max_length(config, max_length), batch_size)
    before = torch.get_num_threads()
    threads = int(threads or before)
    session = _session(Path(onnx_dir), threads=threads)
    tensors = [(torch.from_numpy(ids), torch.from_numpy(mask)) for ids, mask in batches]

    def run_torch(i: int):
        return model(input_ids=tensors[i][0], attention_mask=tensors[i][1]).logits

    def run_ort(i: int):
        ids, mask = batches[i]
        return session.run([OUTPUT_NAME], {"input_ids": ids, "attention_mask": mask})[0]

    seconds = {"torch": 0.0, "ort": 0.0}
    engines = {"torch": run_torch, "ort": run_ort}
    try:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for i in range(len(batches)):  # warm-up: allocator, kernels, ORT's first-run graph work
                run_torch(i)
                run_ort(i)
            for r in range(repeats):
                order = ("torch", "ort") if r % 2 == 0 else ("ort", "torch")
                for i in range(len(batches)):
                    for name in order:
                        t0 = time.perf_counter()
                        engines[name](i)
                        seconds[name] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    tokens = repeats * sum(int(mask.sum()) for _, mask in batches)
    rate = {k: tokens / s if s else 0.0 for k, s in seconds.items()}
    return {"ort_tokens_per_s": rate["ort"], "torch_tokens_per_s": rate["torch"],
            "ratio": rate["ort"] / rate["torch"] if rate["torch"] else 0.0, "threads": threads, "tokens": tokens,
            "ort_seconds": seconds["ort"], "torch_seconds": seconds["torch"], "batches": len(batches),
            "repeats": int(repeats)}


# --------------------------------------------------------------------------------------------------------------
# the onnx_model asset

def script_sample(heldout, max_scripts: int = 12, per_script: int = 1) -> list[str]:
    """Held-out texts of as many scripts as there are (up to ``max_scripts``; the script is the language code's
    suffix, e.g. ``_Cyrl``), ``per_script`` each, in a fixed order: the parity check's inputs."""
    import polars as pl

    df = (heldout.select("declared_lang", "article", "text")
          .with_columns(pl.col("declared_lang").str.split("_").list.last().alias("script"))
          .filter(pl.col("text").str.len_chars() > 0).sort("script", "declared_lang", "article"))
    picked = df.group_by("script", maintain_order=True).head(per_script).head(max_scripts * per_script)
    return picked["text"].to_list()


def bench_texts(heldout, n: int = 64) -> list[str]:
    """``n`` held-out texts spread over the languages (every k-th in a fixed order): the throughput batches."""
    rows = heldout.sort("declared_lang", "article")["text"].to_list()
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def deploy(folder: Path | str, out_dir: Path | str, heldout, *, batch_size: int = 8, repeats: int = 3,
           max_length: int = DEFAULT_MAX_LENGTH, log: Callable[[str], None] = print) -> dict:
    """What the ``onnx_model`` asset does: :func:`export_onnx`, then :func:`parity` on held-out text of every
    script (:func:`script_sample`) and :func:`throughput` on :func:`bench_texts`; the three results are written
    to ``out_dir/onnx_report.json`` and returned."""
    if heldout is None:
        raise FileNotFoundError("no held-out text for the ONNX parity check (the corpus resource's heldout_path)")
    out_dir = Path(out_dir)
    export = export_onnx(folder, out_dir, log=log)
    texts = script_sample(heldout)
    check = parity(folder, out_dir, texts, max_length=max_length)
    log(f"parity on {check['n_texts']} texts of as many scripts ({check['n_tokens']} tokens): max |Δ logit| "
        f"{check['max_abs_diff']:.2e} (tolerance {TOLERANCE:g})")
    speed = throughput(folder, out_dir, bench_texts(heldout), batch_size=batch_size, repeats=repeats,
                       max_length=max_length)
    log(f"throughput, {speed['threads']} thread(s), the same {speed['batches']} padded batches: onnxruntime "
        f"{speed['ort_tokens_per_s']:,.0f} tok/s vs PyTorch {speed['torch_tokens_per_s']:,.0f} tok/s "
        f"(x{speed['ratio']:.2f})")
    report = {"export": export, "parity": check, "throughput": speed}
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    return report


def read_report(folder: Path | str) -> dict:
    """The ``onnx_report.json`` :func:`deploy` wrote."""
    return json.loads((Path(folder) / REPORT_JSON).read_text())
