"""mmbert_dagster.evaluate.onnx_export: a ModernBERT checkpoint -> a self-contained ONNX folder, parity, speed.

The model is test_composer's small ModernBERT (4 layers: global, local, local, global; local window 8) with a
vocabulary large enough for a BPE tokenizer trained here on texts in four scripts (Latin, Cyrillic, CJK, Arabic),
with the special tokens of test_composer's tokenizer folder. Every text is longer than the local window, and one
is longer than the example batch the export traces, so the exported graph runs other batch sizes and lengths.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmbert_dagster.evaluate.onnx_export import (
    ONNX_FILE,
    TOLERANCE,
    OnnxExportError,
    encode_batches,
    export_onnx,
    parity,
    throughput,
)

from test_composer import IDS, hf_config, tokenizer_dir

QUIET = lambda *_: None  # noqa: E731
VOCAB = 320  # > the trained tokenizer's alphabet of four scripts

TEXTS = [
    "All human beings are born free and equal in dignity and rights. They are endowed with reason and conscience.",
    "Все люди рождаются свободными и равными в своем достоинстве и правах. Они наделены разумом и совестью.",
    "人人生而自由，在尊严和权利上一律平等。他们赋有理性和良心，并应以兄弟关系的精神相对待。",
    "يولد جميع الناس أحرارًا متساوين في الكرامة والحقوق. وقد وهبوا عقلاً وضميرًا.",
    "Everyone has the right to life, liberty and security of person. Каждый человек имеет право на жизнь. "
    "人人有权享有生命、自由和人身安全。 لكل فرد الحق في الحياة والحرية وسلامة شخصه. No one shall be held in slavery.",
]


def train_tokenizer(path):
    """A BPE over TEXTS with test_composer's special tokens at their ids, wrapping each text in <bos> ... <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    specials = [f"<{r}>" for r, _ in sorted(IDS.items(), key=lambda kv: kv[1])]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", IDS["bos"]), ("<eos>", IDS["eos"])])
    assert tok.get_vocab_size() <= VOCAB and tok.token_to_id("<mask>") == IDS["mask"]
    tok.save(str(path))
    return tok


def make_checkpoint(root, seed=0):
    """A ModernBERT folder as a stage writes it: save_pretrained + the tokenizer folder's files."""
    from transformers import ModernBertForMaskedLM

    config = hf_config()
    config.vocab_size = VOCAB
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases: logits far from zero, a wrong graph shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = root / f"ckpt{seed}"
    model.save_pretrained(str(folder))
    for f in tokenizer_dir(root).iterdir():  # tokenizer_config.json etc. (Gemma-like roles), README.md
        shutil.copy2(f, folder / f.name)
    train_tokenizer(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    folder = make_checkpoint(root)
    summary = export_onnx(folder, root / "onnx", log=QUIET)
    return folder, root / "onnx", summary


def lengths(folder):
    from tokenizers import Tokenizer

    return [len(e.ids) for e in Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(TEXTS)]


def pad(rows, pad_id=IDS["pad"]):
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------

def test_export_matches_pytorch_on_other_shapes_and_scripts(exported):
    folder, out, summary = exported
    assert summary["exporter"] == "torchscript" and summary["size_bytes"] == (out / ONNX_FILE).stat().st_size
    n = lengths(folder)
    window = hf_config().local_attention
    assert min(n) > window  # every text crosses the local layers' window
    assert max(n) > summary["example_shape"][1] and len(TEXTS) != summary["example_shape"][0]
    result = parity(folder, out, TEXTS, batch_size=len(TEXTS))  # one batch: 5 rows, 4 of them padded
    assert result["n_tokens"] == sum(n) and result["batches"] == 1
    assert result["ok"] and result["max_abs_diff"] <= TOLERANCE, result
    # truncation keeps the closing <eos> ([SEP]); a second shape through the same graph
    cut = parity(folder, out, TEXTS, max_length=20, batch_size=2)
    assert cut["ok"] and cut["n_tokens"] == sum(min(k, 20) for k in n) and cut["batches"] == 3


def test_batches_are_cut_keeping_the_closing_sep_and_right_padded(exported):
    folder = exported[0]
    n = lengths(folder)
    batches = encode_batches(folder, TEXTS, max_length=20, batch_size=2)
    assert [ids.shape for ids, _ in batches] == [(2, 20), (2, 20), (1, 20)]
    for k, (ids, mask) in zip(n, (row for b in batches for row in zip(*b))):
        used = min(k, 20)
        assert mask.tolist() == [1] * used + [0] * (20 - used)
        assert ids[0] == IDS["bos"] and ids[used - 1] == IDS["eos"]  # [CLS] ... [SEP] also when cut
        assert (ids[used:] == IDS["pad"]).all()


def test_parity_flags_an_onnx_of_other_weights(exported, tmp_path):
    folder, out, _ = exported
    other = make_checkpoint(tmp_path, seed=1)
    result = parity(other, out, TEXTS[:2])
    assert not result["ok"] and result["max_abs_diff"] > 100 * TOLERANCE


def test_the_folder_serves_on_its_own_and_padding_changes_nothing(exported):
    import onnx
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder, out, summary = exported
    assert summary["files"] == sorted(p.name for p in out.iterdir())
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    assert "model.safetensors" not in summary["files"] and "README.md" not in summary["files"]
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    graph = onnx.load(str(out / ONNX_FILE)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"] and graph.output[0].name == "logits"
    assert all(not d.HasField("dim_value") for v in (*graph.input, *graph.output)
               for d in v.type.tensor_type.shape.dim[:2])  # batch and sequence are symbolic

    # onnxruntime + tokenizers only, from the exported folder: a text alone = the same text in a padded batch
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    rows = [e.ids for e in Tokenizer.from_file(str(out / "tokenizer.json")).encode_batch(TEXTS[:3])]
    ids, mask = pad(rows)
    batch = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert batch.shape == (3, max(map(len, rows)), VOCAB)
    for i, r in enumerate(rows):
        alone = session.run(None, {"input_ids": np.asarray([r], dtype=np.int64),
                                   "attention_mask": np.ones((1, len(r)), dtype=np.int64)})[0][0]
        np.testing.assert_allclose(batch[i, :len(r)], alone, atol=1e-4)


@pytest.mark.parametrize("damage, message", [
    ("no_config", "lacks config.json"),
    ("truncated", "model.safetensors is corrupt or truncated"),
    ("bert", "model_type = 'bert'"),
    ("no_tokenizer", "no usable tokenizer"),
])
def test_a_broken_folder_is_refused_before_any_export(exported, tmp_path, monkeypatch, damage, message):
    folder = shutil.copytree(exported[0], tmp_path / "ckpt")
    if damage == "no_config":
        (folder / "config.json").unlink()
    elif damage == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bert":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    else:
        (folder / "tokenizer.json").unlink()
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(a))
    out_root = tmp_path / "exports"
    with pytest.raises(OnnxExportError, match=rf"{folder}: .*{message}"):
        export_onnx(folder, out_root / "onnx", log=QUIET)
    assert not calls  # refused before tracing
    assert not out_root.exists() or not list(out_root.iterdir())  # no output, no temporary folder
    assert issubclass(OnnxExportError, ValueError)


def test_a_failed_export_leaves_the_previous_one_and_no_temporary_folder(exported, tmp_path, monkeypatch):
    folder = exported[0]
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")

    def broken(model, args, path, **kwargs):
        open(path, "wb").write(b"half a graph")
        raise RuntimeError("exporter crashed")

    with monkeypatch.context() as m:
        m.setattr(torch.onnx, "export", broken)
        with pytest.raises(OnnxExportError, match=rf"{folder}: ONNX export failed: RuntimeError: exporter crashed"):
            export_onnx(folder, out, log=QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"] and (out / "stale.txt").is_file()

    export_onnx(folder, out, log=QUIET)  # a successful one replaces the folder as a whole
    assert not (out / "stale.txt").exists() and (out / ONNX_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_throughput_times_both_engines_on_the_same_tokens(exported):
    folder, out, _ = exported
    before = torch.get_num_threads()
    result = throughput(folder, out, TEXTS, batch_size=2, repeats=2, threads=1)
    assert result["ort_tokens_per_s"] > 0 and result["torch_tokens_per_s"] > 0
    assert result["tokens"] == 2 * sum(lengths(folder)) and result["batches"] == 3 and result["threads"] == 1
    assert result["ratio"] == pytest.approx(result["ort_tokens_per_s"] / result["torch_tokens_per_s"])
    assert result["ort_tokens_per_s"] == pytest.approx(result["tokens"] / result["ort_seconds"])
    assert torch.get_num_threads() == before  # the caller's thread count is restored


def test_deploy_exports_checks_and_times_on_held_out_text_of_every_script(exported, tmp_path):
    """The onnx_model asset's call: one text per script for the parity, the report written beside model.onnx."""
    import polars as pl

    from mmbert_dagster.evaluate.onnx_export import REPORT_JSON, deploy, read_report, script_sample

    folder, _, _ = exported
    langs = ["eng_Latn", "rus_Cyrl", "cmn_Hans", "arb_Arab", "deu_Latn"]
    heldout = pl.DataFrame({"declared_lang": langs, "article": [25] * 5, "text": TEXTS})
    texts = script_sample(heldout)
    assert sorted(texts) == sorted(TEXTS[1:])  # Arab, Cyrl, Hans, Latn (deu_Latn before eng_Latn): one each
    report = deploy(folder, tmp_path / "onnx", heldout, batch_size=2, repeats=1, log=QUIET)
    assert (tmp_path / "onnx" / ONNX_FILE).is_file() and (tmp_path / "onnx" / REPORT_JSON).is_file()
    assert read_report(tmp_path / "onnx") == json.loads(json.dumps(report))
    assert report["parity"]["ok"] and report["parity"]["n_texts"] == 4
    assert report["throughput"]["ort_tokens_per_s"] > 0
    with pytest.raises(FileNotFoundError, match="heldout_path"):
        deploy(folder, tmp_path / "none", None, log=QUIET)
