import json

import polars as pl
import pytest

from mmbert_dagster.data import sources
from mmbert_dagster.data.sources import SkipCounter, SourceError, iter_huggingface, iter_local_files, write_raw_corpus

TEXT = "Alle Menschen sind frei und gleich an Würde und Rechten geboren."


def test_jsonl_parquet_and_text_files_are_read_with_languages(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": TEXT, "lang": "deu_Latn", "id": "x1"}) + "\n\n")
    pl.DataFrame({"text": ["Bonjour à tous."], "lang": ["fra_Latn"]}).write_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("Plain text document.")
    docs = list(iter_local_files([str(tmp_path / "*")], lang_field="lang", id_field="id"))
    by_id = {d["doc_id"]: d for d in docs}
    assert by_id["x1"]["declared_lang"] == "deu_Latn" and by_id["x1"]["text"] == TEXT
    assert by_id["b.parquet:1"]["declared_lang"] == "fra_Latn"
    assert by_id["c.txt"]["declared_lang"] == "und"  # no language field for plain text


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": TEXT}) + "\n{not json\n")
    with pytest.raises(SourceError, match=r"bad\.jsonl:2: malformed JSON"):
        list(iter_local_files([str(f)]))


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(json.dumps({"text": TEXT}).encode() + b"\n{oops\n" + b'{"text": "\xff\xfe bad"}\n' + b'{"txt": 1}\n')
    skips = SkipCounter()
    logged = []
    docs = list(iter_local_files([str(f)], on_bad_record="skip", skips=skips, log=logged.append))
    assert len(docs) == 1
    assert sum(skips.counts.values()) == 3
    assert any("invalid UTF-8" in reason for reason in skips.counts)
    assert any("mixed.jsonl:2" in line for line in logged)


def test_lone_surrogate_escape_is_an_error_naming_file_line_and_field(tmp_path):
    f = tmp_path / "surrogate.jsonl"
    # valid JSON (six characters \ud800 in the file), but the decoded string is not Unicode text
    f.write_text(json.dumps({"text": TEXT}) + "\n" + '{"text": "ok", "lang": "x\\ud800y"}\n')
    assert "\\ud800" in f.read_text()
    with pytest.raises(SourceError, match=r"surrogate\.jsonl:2: field 'lang' holds a lone surrogate \\ud800"):
        list(iter_local_files([str(f)], lang_field="lang"))
    skips = SkipCounter()
    docs = list(iter_local_files([str(f)], lang_field="lang", on_bad_record="skip", skips=skips, log=lambda _: None))
    assert [d["text"] for d in docs] == [TEXT] and sum(skips.counts.values()) == 1
    write_raw_corpus(iter(docs), tmp_path / "raw", log=lambda _: None)  # what is left encodes as UTF-8


def test_surrogate_pairs_are_one_character_and_kept(tmp_path):
    f = tmp_path / "emoji.jsonl"
    f.write_text('{"text": "smile \\ud83d\\ude00 twice"}\n')
    assert [d["text"] for d in iter_local_files([str(f)])] == ["smile \U0001F600 twice"]


def test_invalid_utf8_is_an_error_naming_the_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("Grüße".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.txt: invalid UTF-8 at byte 2"):
        list(iter_local_files([str(f)]))


def test_missing_paths_and_empty_inputs_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(iter_local_files([str(tmp_path / "nope.jsonl")]))
    with pytest.raises(SourceError, match="matches no file"):
        list(iter_local_files([str(tmp_path / "*.jsonl")]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SourceError, match="no documents"):
        write_raw_corpus(iter_local_files([str(tmp_path / "empty.jsonl")]), tmp_path / "out")
    with pytest.raises(SourceError, match="unsupported file type"):
        (tmp_path / "x.csv").write_text("a,b")
        list(iter_local_files([str(tmp_path / "x.csv")]))


def test_parquet_without_text_column_is_rejected(tmp_path):
    pl.DataFrame({"body": ["x"]}).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(SourceError, match=r"p\.parquet: no column 'text'"):
        list(iter_local_files([str(tmp_path / "p.parquet")]))


def test_duplicate_doc_ids_are_rejected(tmp_path):
    docs = [{"doc_id": "a", "source": "s", "declared_lang": "und", "text": "x"}] * 2
    with pytest.raises(SourceError, match="duplicate doc_id 'a'"):
        write_raw_corpus(iter(docs), tmp_path)


def test_raw_corpus_is_written_in_parts_and_read_back(tmp_path):
    docs = [{"doc_id": str(i), "source": "s", "declared_lang": "eng_Latn", "text": f"doc {i}"} for i in range(25)]
    stats = write_raw_corpus(iter(docs), tmp_path, rows_per_part=10)
    assert stats == {"docs": 25, "bytes": sum(len(d["text"]) for d in docs), "parts": 3, "declared_languages": 1}
    assert sources.read_docs(tmp_path).collect().height == 25


def test_huggingface_source_offline_says_so():
    with pytest.raises(SourceError, match="HF_HUB_OFFLINE=1"):
        list(iter_huggingface("HuggingFaceFW/fineweb-2", ["deu_Latn"]))


def test_huggingface_source_reads_a_local_dataset_in_fineweb2_layout(tmp_path):
    for config, text in [("deu_Latn", TEXT), ("fra_Latn", "Tous les êtres humains naissent libres.")]:
        folder = tmp_path / "data" / config / "train"
        folder.mkdir(parents=True)
        pl.DataFrame({"text": [text, text + " 2"], "id": [f"{config}-1", f"{config}-2"],
                      "language": [config[:3]] * 2}).write_parquet(folder / "000_00000.parquet")
    docs = list(iter_huggingface(str(tmp_path), ["deu_Latn", "fra_Latn"], max_docs_per_config=1))
    assert [(d["doc_id"], d["declared_lang"]) for d in docs] == [("deu_Latn-1", "deu_Latn"), ("fra_Latn-1", "fra_Latn")]
    with pytest.raises(SourceError, match="no parquet files for config 'yor_Latn'"):
        list(iter_huggingface(str(tmp_path), ["yor_Latn"]))


def test_embedded_corpus_has_the_promised_skew():
    corpus = pl.read_parquet(sources.embedded_dir() / "corpus.parquet")
    per_lang = corpus.group_by("declared_lang").agg(bytes=pl.col("text").str.len_bytes().sum()).sort("bytes", descending=True)
    assert per_lang.height >= 300
    assert per_lang.filter(pl.col("bytes") >= 1_000_000).height >= 10
    assert "eng_Latn" in per_lang.head(3)["declared_lang"].to_list()
    assert corpus["doc_id"].n_unique() == corpus.height
    heldout = pl.read_parquet(sources.embedded_heldout())
    assert heldout["declared_lang"].n_unique() >= 300 and heldout.height > 0


def test_a_replay_source_is_read_after_the_corpus_with_the_same_settings(tmp_path):
    """extend: the new languages from `paths`, text of languages the checkpoint knows from `replay_paths`."""
    from mmbert_dagster.resources import CorpusSource

    (tmp_path / "new").mkdir()
    (tmp_path / "known").mkdir()
    (tmp_path / "new" / "yor.jsonl").write_text(json.dumps({"body": "Gbogbo ènìyàn ni a bí ní òmìnira.",
                                                            "lang": "yor_Latn"}) + "\n")
    (tmp_path / "known" / "deu.jsonl").write_text(json.dumps({"body": TEXT, "lang": "deu_Latn"}) + "\n")
    source = CorpusSource(kind="local", paths=[str(tmp_path / "new")], replay_paths=[str(tmp_path / "known")],
                          text_field="body", lang_field="lang")
    docs = list(source.documents(lambda _: None, SkipCounter()))
    assert [d["declared_lang"] for d in docs] == ["yor_Latn", "deu_Latn"]
    assert docs[1]["text"] == TEXT
    source = CorpusSource(kind="local", paths=[str(tmp_path / "new")], replay_paths=[str(tmp_path / "nowhere")],
                          text_field="body", lang_field="lang")
    with pytest.raises(SourceError, match="nowhere"):
        list(source.documents(lambda _: None, SkipCounter()))
