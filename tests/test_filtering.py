"""Behaviour of the datatrove filtering step (mmbert_dagster.data.filtering) on tiny, hand-written inputs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import polars as pl  # noqa: E402
import pytest  # noqa: E402

from mmbert_dagster.data import filtering, scripts  # noqa: E402
from mmbert_dagster.data.filtering import FilterReport, run_filters  # noqa: E402
from mmbert_dagster.recipe import FilterConfig  # noqa: E402

# Realistic paragraphs (the same news item in each language), long enough for min_doc_chars=200 / min_doc_words=30.
TEXTS = {
    "eng_Latn": (
        "The village library opened its doors again last spring after a long renovation. Volunteers repainted the "
        "reading room, repaired the old wooden shelves and sorted thousands of donated books by subject. On Saturday "
        "mornings the librarian reads stories to children, while their parents browse the new collection of local "
        "history. Many residents say that the library has become the heart of the community, a quiet place where "
        "neighbours meet, students prepare for exams and older people learn to use computers with the help of "
        "teenagers from the nearby school."
    ),
    "deu_Latn": (
        "Die kleine Stadtbibliothek wurde im vergangenen Frühjahr nach einer langen Renovierung wieder eröffnet. "
        "Freiwillige haben den Lesesaal neu gestrichen, die alten Holzregale repariert und tausende gespendete Bücher "
        "nach Themen sortiert. Am Samstagvormittag liest die Bibliothekarin den Kindern Geschichten vor, während die "
        "Eltern in der neuen Sammlung zur Ortsgeschichte stöbern. Viele Einwohner sagen, dass die Bibliothek zum "
        "Herz der Gemeinde geworden ist, ein ruhiger Ort, an dem sich Nachbarn treffen und Schüler für ihre "
        "Prüfungen lernen."
    ),
    "rus_Cyrl": (
        "Небольшая городская библиотека снова открылась прошлой весной после долгого ремонта. Добровольцы покрасили "
        "читальный зал, починили старые деревянные полки и разобрали по темам тысячи подаренных книг. По субботам "
        "библиотекарь читает детям сказки, а их родители тем временем знакомятся с новой коллекцией по истории края. "
        "Многие жители говорят, что библиотека стала сердцем нашего района: здесь встречаются соседи, школьники "
        "готовятся к экзаменам, а пожилые люди учатся пользоваться компьютером."
    ),
    "cmn_Hans": (
        "去年春天，经过长时间的翻修，镇上的小图书馆终于重新开放了。志愿者们粉刷了阅览室，修好了旧木书架，还把几千本捐赠的"
        "图书按照主题分类整理。每到星期六上午，图书管理员都会给孩子们讲故事，家长们则在一旁翻阅新添置的地方史资料。许多居民"
        "说，图书馆已经成为社区的中心：邻居们在这里见面聊天，学生们在这里准备考试，老人们也在附近中学生的帮助下学习使用电脑。"
        "大家都希望这个安静而温暖的地方能够一直开下去，也欢迎更多的人来这里读书、交流和分享自己的故事。"
    ),
    "jpn_Jpan": (
        "町の小さな図書館は、長い改修工事を終えて、去年の春にようやく再開しました。ボランティアの人たちが閲覧室の壁を塗り"
        "直し、古い木の本棚を修理して、寄贈された何千冊もの本をテーマごとに整理しました。毎週土曜日の朝には司書が子どもたち"
        "に絵本を読み聞かせ、その間に親たちは郷土史の新しいコレクションを眺めています。多くの住民は、図書館が地域の中心になっ"
        "たと話しています。近所の人が顔を合わせ、学生が試験勉強をし、お年寄りが近くの中学生に教わりながらパソコンの使い方を"
        "学ぶ、静かで温かい場所です。"
    ),
    "arb_Arab": (
        "أعادت مكتبة البلدة الصغيرة فتح أبوابها في الربيع الماضي بعد أعمال ترميم طويلة. قام المتطوعون بطلاء قاعة "
        "القراءة وإصلاح الرفوف الخشبية القديمة وترتيب آلاف الكتب المتبرع بها حسب الموضوع. وفي صباح كل سبت تقرأ أمينة "
        "المكتبة القصص للأطفال، بينما يتصفح الآباء المجموعة الجديدة من كتب التاريخ المحلي. ويقول كثير من السكان إن "
        "المكتبة أصبحت قلب الحي، فهي مكان هادئ يلتقي فيه الجيران ويستعد فيه الطلاب للامتحانات ويتعلم فيه كبار السن "
        "استخدام الحاسوب."
    ),
    "hin_Deva": (
        "कस्बे का छोटा पुस्तकालय लंबे समय तक चली मरम्मत के बाद पिछले वसंत में फिर से खुल गया। स्वयंसेवकों ने वाचनालय "
        "की दीवारों को रंगा, लकड़ी की पुरानी अलमारियों की मरम्मत की और दान में मिली हज़ारों किताबों को विषय के अनुसार "
        "लगाया। हर शनिवार की सुबह पुस्तकालय की प्रमुख बच्चों को कहानियाँ सुनाती हैं, जबकि उनके माता-पिता स्थानीय इतिहास "
        "के नए संग्रह को देखते हैं। कई निवासियों का कहना है कि पुस्तकालय अब मोहल्ले का दिल बन गया है, जहाँ पड़ोसी मिलते "
        "हैं और विद्यार्थी परीक्षा की तैयारी करते हैं।"
    ),
    "amh_Ethi": (
        "የከተማችን ትንሽ ቤተ መጻሕፍት ለረጅም ጊዜ ከቆየ እድሳት በኋላ ባለፈው የጸደይ ወቅት እንደገና ተከፈተ። በጎ ፈቃደኞች የንባብ "
        "ክፍሉን ቀለም ቀቡ፣ የቆዩትን የእንጨት መደርደሪያዎች አደሱ፣ በስጦታ የተገኙትን በሺዎች የሚቆጠሩ መጻሕፍትም በርዕስ አደራጁ። "
        "በየቅዳሜው ጠዋት የቤተ መጻሕፍቱ ሠራተኛ ለልጆች ተረት ታነባለች፤ ወላጆቻቸው ደግሞ አዲሱን የአካባቢ ታሪክ ስብስብ ይመለከታሉ። "
        "ብዙ ነዋሪዎች ቤተ መጻሕፍቱ የሰፈሩ ልብ ሆኗል ይላሉ፤ ጎረቤቶች የሚገናኙበት፣ ተማሪዎች ለፈተና የሚዘጋጁበትና አረጋውያን "
        "ኮምፒውተር መጠቀም የሚማሩበት ጸጥ ያለ ቦታ ነው።"
    ),
    "vie_Latn": (  # one token per syllable: average "word" length ~3.3, below English Gopher's minimum of 3
        "Thư viện nhỏ của thị trấn đã mở cửa trở lại vào mùa xuân năm ngoái sau một thời gian dài sửa chữa. Các "
        "tình nguyện viên đã sơn lại phòng đọc, sửa những kệ sách gỗ cũ và sắp xếp hàng nghìn cuốn sách được quyên "
        "góp theo chủ đề. Mỗi sáng thứ bảy, thủ thư đọc truyện cho các em nhỏ, trong khi cha mẹ các em xem bộ sưu "
        "tập mới về lịch sử địa phương. Nhiều người dân nói rằng thư viện đã trở thành trái tim của cả khu phố."
    ),
    "kor_Hang": (
        "작은 마을 도서관이 오랜 보수 공사를 마치고 지난봄에 다시 문을 열었다. 자원봉사자들은 열람실 벽을 새로 칠하고 낡은 "
        "나무 책장을 고쳤으며, 기증받은 수천 권의 책을 주제별로 정리했다. 매주 토요일 아침이면 사서가 아이들에게 동화를 읽어 "
        "주고, 부모들은 새로 들어온 향토사 자료를 살펴본다. 많은 주민들은 도서관이 동네의 중심이 되었다고 말한다. 이웃들이 "
        "만나고 학생들이 시험을 준비하며 어르신들이 컴퓨터 사용법을 배우는 조용하고 따뜻한 곳이다."
    ),
    "tha_Thai": (
        "ห้องสมุดเล็ก ๆ ของเมืองเปิดให้บริการอีกครั้งเมื่อฤดูใบไม้ผลิที่ผ่านมา หลังจากการปรับปรุงซ่อมแซมเป็นเวลานาน "
        "อาสาสมัครช่วยกันทาสีห้องอ่านหนังสือ ซ่อมชั้นวางหนังสือไม้เก่า และจัดหมวดหมู่หนังสือบริจาคหลายพันเล่มตามหัวข้อ "
        "ทุกเช้าวันเสาร์บรรณารักษ์จะอ่านนิทานให้เด็ก ๆ ฟัง ขณะที่พ่อแม่เลือกดูหนังสือประวัติศาสตร์ท้องถิ่นชุดใหม่ "
        "ชาวบ้านหลายคนบอกว่าห้องสมุดได้กลายเป็นหัวใจของชุมชน เป็นสถานที่เงียบสงบที่เพื่อนบ้านได้พบปะกันและนักเรียนได้เตรียมสอบ"
    ),
}

MORE_ENGLISH = (
    "Last year the town council agreed to fund a small digital archive. Two retired teachers now scan old "
    "photographs, letters and parish records every Wednesday, and a student from the university writes short "
    "descriptions for each item. The archive is free to use, and visitors from abroad have already found traces "
    "of their grandparents in documents that nobody had opened for decades."
)
SYMBOL_SOUP = " ".join(f"{n:04d} $%^& *@!~ {{}}|<> ++== ~~" for n in range(0, 9000, 137))
REPEATED_LINE = "\n".join(["Buy cheap watches online today and get the best price of the year."] * 50)
TOO_SHORT = "Hello there, this is far too short."


def _write(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    """rows: (doc_id, declared_lang, text)."""
    pl.DataFrame(
        {"doc_id": [r[0] for r in rows], "source": ["test"] * len(rows),
         "declared_lang": [r[1] for r in rows], "text": [r[2] for r in rows]},
        schema={"doc_id": pl.String, "source": pl.String, "declared_lang": pl.String, "text": pl.String},
    ).write_parquet(path)
    return path


def _run(tmp_path: Path, rows, cfg: FilterConfig | None = None, **kw) -> tuple[FilterReport, Path]:
    inp = _write(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    out.mkdir()
    report = run_filters([inp], out, cfg or FilterConfig(), tmp_path / "work", log=lambda msg: None, **kw)
    return report, out


def _drops(out: Path) -> dict[str, tuple[str, str]]:
    drops = pl.read_parquet(out / "drops.parquet").select("doc_id", "step", "reason")
    return {d: (s, r) for d, s, r in drops.iter_rows()}


def test_realistic_paragraphs_in_every_script_are_kept(tmp_path):
    rows = [(f"d-{lang}", lang, text) for lang, text in TEXTS.items()]
    report, out = _run(tmp_path, rows)
    assert _drops(out) == {}
    kept = pl.read_parquet(out / "docs.parquet")
    assert kept["doc_id"].to_list() == sorted(r[0] for r in rows)
    assert kept.columns == ["doc_id", "source", "declared_lang", "text"]
    assert report.docs_in == report.docs_out == len(rows)


def test_junk_is_dropped_by_the_right_step_with_datatrove_reason(tmp_path):
    rows = [
        ("soup", "eng_Latn", SYMBOL_SOUP),
        ("repeat", "eng_Latn", REPEATED_LINE),
        ("short", "deu_Latn", TOO_SHORT),
        ("good", "eng_Latn", TEXTS["eng_Latn"]),
    ]
    report, out = _run(tmp_path, rows)
    drops = _drops(out)
    assert drops["short"] == ("normalize", "too_short")
    # filters run cheapest first: FineWeb's line checks see the symbol soup before Gopher does
    assert drops["soup"] == ("fineweb_quality", "line_punct_ratio")
    assert drops["repeat"] == ("fineweb_quality", "char_dup_ratio")
    assert "good" not in drops
    assert report.docs_out == 1


def test_english_stop_word_check_applies_to_english_only(tmp_path):
    # German text declared as English lacks the English stop words; declared as German it is kept
    rows = [("as-eng", "eng_Latn", TEXTS["deu_Latn"]), ("as-deu", "deu_Latn", TEXTS["deu_Latn"] + " Ende.")]
    _, out = _run(tmp_path, rows)
    assert _drops(out) == {"as-eng": ("gopher_quality", "gopher_enough_stop_words")}


@pytest.mark.parametrize("code", ["xyz_Zzzz", "und", "", None, "not-a-code", "qqq_Qaaa"])
def test_unknown_language_codes_do_not_crash_and_normal_text_is_kept(tmp_path, code):
    rows = [("latin", code, TEXTS["deu_Latn"]), ("han", code, TEXTS["cmn_Hans"]), ("thai", code, TEXTS["tha_Thai"])]
    report, out = _run(tmp_path, rows)
    assert _drops(out) == {}
    assert report.docs_out == 3
    assert pl.read_parquet(out / "docs.parquet")["declared_lang"].to_list() == [code] * 3  # written back unchanged


def test_unknown_script_junk_is_still_dropped(tmp_path):
    _, out = _run(tmp_path, [("soup", "und", SYMBOL_SOUP), ("short", "xyz_Zzzz", TOO_SHORT)])
    assert _drops(out) == {"soup": ("fineweb_quality", "line_punct_ratio"),
                           "short": ("normalize", "too_short")}


def test_near_duplicates_keep_the_smallest_doc_id_and_record_minhash_dedup(tmp_path):
    a = TEXTS["eng_Latn"] + "\n\n" + MORE_ENGLISH
    b = a.replace("thousands", "hundreds").replace("Last year", "This year")
    rows = [("a", "eng_Latn", a), ("b", "eng_Latn", b), ("other", "deu_Latn", TEXTS["deu_Latn"])]
    report, out = _run(tmp_path, rows)
    drops = _drops(out)
    assert len(drops) == 1
    assert drops == {"b": ("minhash_dedup", "near_duplicate")}
    assert report.docs_out == 2


def test_exact_duplicates_are_removed(tmp_path):
    rows = [(f"copy{i}", "rus_Cyrl", TEXTS["rus_Cyrl"]) for i in range(3)] + [("zh", "cmn_Hans", TEXTS["cmn_Hans"])]
    report, out = _run(tmp_path, rows)
    assert _drops(out) == {"copy1": ("minhash_dedup", "exact_duplicate"), "copy2": ("minhash_dedup", "exact_duplicate")}
    assert report.docs_out == 2


def test_normalization_fixes_mojibake_and_strips_control_characters(tmp_path):
    text = TEXTS["deu_Latn"].replace("für", "fÃ¼r") + "\x00\x1b\r\nE\u0301nde gut, alles gut.\r\n"
    _, out = _run(tmp_path, [("d", "deu_Latn", text)])
    kept = pl.read_parquet(out / "docs.parquet")["text"][0]
    assert "für" in kept and "Ã" not in kept
    assert "\x00" not in kept and "\x1b" not in kept and "\r" not in kept
    assert "\u00c9nde" in kept  # NFC: E + combining acute → É


def test_empty_input_gives_zero_documents_and_empty_outputs(tmp_path):
    report, out = _run(tmp_path, [])
    assert (report.docs_in, report.docs_out, report.bytes_out) == (0, 0, 0)
    assert report.drops.height == 0
    for name in ("docs.parquet", "drops.parquet", "drop_counts.parquet"):
        assert pl.read_parquet(out / name).height == 0
    assert pl.read_parquet(out / "docs.parquet").columns == ["doc_id", "source", "declared_lang", "text"]
    out2 = tmp_path / "out2"
    out2.mkdir()
    assert run_filters([], out2, FilterConfig(), tmp_path / "work", log=lambda m: None).docs_out == 0


def test_drop_counts_add_up_per_language(tmp_path):
    rows = [(f"d-{lang}", lang, text) for lang, text in TEXTS.items()] + [
        ("soup", "eng_Latn", SYMBOL_SOUP), ("repeat", "deu_Latn", REPEATED_LINE), ("short", "cmn_Hans", "太短了。"),
        ("dup", "hin_Deva", TEXTS["hin_Deva"]), ("und-short", "und", TOO_SHORT),
    ]
    report, out = _run(tmp_path, rows)
    assert report.docs_in - report.docs_out == report.drops["docs"].sum() == 5
    counts = pl.read_parquet(out / "drop_counts.parquet")
    assert counts.columns == ["declared_lang", "step", "reason", "docs", "bytes"]
    assert counts.equals(report.drops)
    inputs = pl.read_parquet(tmp_path / "in.parquet")
    kept = pl.read_parquet(out / "docs.parquet")
    per_lang = counts.group_by("declared_lang").agg(pl.col("docs").sum())
    for lang, n_drops in per_lang.iter_rows():
        n_in = inputs.filter(pl.col("declared_lang") == lang).height
        n_out = kept.filter(pl.col("declared_lang") == lang).height
        assert n_in - n_out == n_drops, lang
    # every input document is either kept or recorded as dropped, never both
    dropped = set(pl.read_parquet(out / "drops.parquet")["doc_id"])
    assert dropped.isdisjoint(kept["doc_id"]) and dropped | set(kept["doc_id"]) == set(inputs["doc_id"])
    assert report.bytes_in == inputs["text"].str.len_bytes().sum()
    assert report.bytes_in == kept.join(inputs, on="doc_id")["text_right"].str.len_bytes().sum() + counts["bytes"].sum()


def test_thresholds_come_from_the_recipe(tmp_path):
    rows = [("en", "eng_Latn", TEXTS["eng_Latn"])]
    _, out = _run(tmp_path, rows, cfg=FilterConfig(min_doc_words=500))
    assert _drops(out) == {"en": ("gopher_quality", "gopher_short_doc")}


def test_filters_that_drop_everything_are_explained_by_filter_reason_and_setting(tmp_path):
    rows = [(f"d-{lang}", lang, text) for lang, text in TEXTS.items()] + [("short", "eng_Latn", TOO_SHORT)]
    cfg = FilterConfig(min_doc_words=100_000)
    report, _ = _run(tmp_path, rows, cfg=cfg)
    assert report.docs_out == 0
    why = filtering.why_nothing_kept(report, cfg, "my.toml")
    n = len(TEXTS)
    assert why.startswith(f"my.toml: [filters] removed all {n + 1} documents")
    assert f"gopher_quality dropped {n} (gopher_short_doc: {n}) with min_doc_words = 100000 (x2 " in why
    assert "before it, normalize dropped 1 (too_short: 1) with min_doc_chars = 200" in why
    for name, kept_rows in (("some_kept", rows[:1]), ("no_input", [])):
        (tmp_path / name).mkdir()
        assert filtering.why_nothing_kept(_run(tmp_path / name, kept_rows)[0], FilterConfig()) is None


def test_reruns_in_the_same_work_dir_redo_the_work(tmp_path):
    # datatrove skips tasks a reused logging folder marks complete: each call must use a fresh one
    inp = _write(tmp_path / "in.parquet", [("en", "eng_Latn", TEXTS["eng_Latn"])])
    for i in range(2):
        out = tmp_path / f"out{i}"
        out.mkdir()
        assert run_filters([inp], out, FilterConfig(), tmp_path / "work", log=lambda m: None).docs_out == 1


def test_parallel_workers_give_the_same_result_as_one(tmp_path):
    # duplicates that land in different tasks are still found, and the same one of them is kept
    rows = [(f"d-{lang}", lang, text) for lang, text in TEXTS.items()] + [
        ("soup", "eng_Latn", SYMBOL_SOUP), ("copy", "arb_Arab", TEXTS["arb_Arab"]), ("short", "und", TOO_SHORT),
        ("near", "eng_Latn", TEXTS["eng_Latn"].replace("spring", "autumn"))]
    r1, out1 = _run(tmp_path, rows)
    out2 = tmp_path / "out2"
    out2.mkdir()
    run_filters([tmp_path / "in.parquet"], out2, FilterConfig(), tmp_path / "work", workers=2, log=lambda m: None)
    assert pl.read_parquet(out1 / "docs.parquet").equals(pl.read_parquet(out2 / "docs.parquet"))
    assert pl.read_parquet(out1 / "drops.parquet").equals(pl.read_parquet(out2 / "drops.parquet"))
    assert _drops(out2)["d-arb_Arab"] == ("minhash_dedup", "exact_duplicate")
    assert _drops(out2)["near"] == ("minhash_dedup", "near_duplicate")


def test_bad_inputs_raise_clear_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    pl.DataFrame({"doc_id": ["a"], "text": ["x"]}).write_parquet(bad)
    with pytest.raises(ValueError, match="lacks column"):
        run_filters([bad], tmp_path, FilterConfig(), tmp_path / "work", log=lambda m: None)
    dup = _write(tmp_path / "dup.parquet", [("a", "und", "x"), ("a", "und", "y")])
    with pytest.raises(ValueError, match="unique"):
        run_filters([dup], tmp_path, FilterConfig(), tmp_path / "work", log=lambda m: None)


def test_word_splitting_follows_the_script():
    tok = scripts.WORD_TOKENIZER.word_tokenize
    assert tok("Don't stop, me...") == ["Don", "'", "t", "stop", ",", "me", ".", ".", "."]
    assert tok("图书馆iPhone。") == ["图", "书", "馆", "iPhone", "。"]
    assert tok("नमस्ते दुनिया।") == ["नमस्ते", "दुनिया", "।"]
    assert tok("ห้องสมุด") == ["ห้", "อ", "ง", "ส", "มุ", "ด"]  # letters with their marks, not code points


def test_repeated_phrases_in_one_paragraph_are_dropped_by_gopher_repetition(tmp_path):
    spam = "Buy cheap watches online today and you get the best price of the year. " * 30
    _, out = _run(tmp_path, [("spam", "eng_Latn", spam), ("good", "eng_Latn", TEXTS["eng_Latn"])])
    drops = _drops(out)
    assert set(drops) == {"spam"}
    assert drops["spam"][0] == "gopher_repetition"
