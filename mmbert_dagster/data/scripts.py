"""Word splitting and script profiles for the quality filters (``data/filtering.py``): how a document's text is
cut into words, and which thresholds its script calls for.

Word splitting. datatrove's filters split words with a per-language tokenizer (``language=`` →
``load_word_tokenizer``). Offline, none of them works with this project's dependencies: the spaCy-, IndicNLP-,
pythainlp- and Kiwi-backed ones need packages that are not installed, NLTK needs downloaded punkt data, stanza
downloads models, and even datatrove's ``WhitespaceTokenizer`` goes through spaCy. spaCy is also far too slow
for this budget (measured 0.07–0.4 MB/s of text; jieba 0.02 MB/s). So every document goes through
:class:`ScriptAwareWordTokenizer`, a regex splitter (3–10 MB/s) whose unit depends on each character's script:
one token per character for Han/Kana/Bopomofo/Yi, one per letter with its combining marks for the unspaced
abugidas (Thai, Lao, Khmer, Myanmar, Tibetan, ...), and runs of letters, marks and digits for every spaced script;
punctuation and symbols are tokens of their own (as with spaCy, which the thresholds were tuned with).

Script profiles. Thresholds that assume spaced, alphabetic words (average word length 3–10 characters, English
stop words, 30-character "short lines", terminal punctuation at line ends) would drop every normal Chinese, Thai
or Korean document, so each document gets a profile from its declared script (or, for ``und``, unknown codes and
scripts not listed here, from the letters of its text), and :class:`PerProfileFilter` sends it to a datatrove filter
instance configured for that profile:

- ``english`` (``eng_*``): Gopher as published, including its stop-word check (English stop words);
- ``alphabetic`` (Latin, Cyrillic, Greek, Armenian, Georgian): Gopher without the stop-word check, average word
  length 2–15 characters instead of 3–10 (Vietnamese averages ~3.3, Greenlandic over 10);
- ``spaced`` (every other spaced script: Arabic, Hebrew, Devanagari, Ethiopic, Hangul, ...): no minimum average
  word length (syllabic scripts have short words), maximum 20 characters;
- ``dense`` (Han, Kana, ...; one token per character): no average-word-length bounds, word-count bounds doubled
  (≈ characters per word), repetition n-grams doubled in length, "short line" = 10 characters;
- ``unspaced`` (Thai, Lao, Khmer, ...; one token per letter): as ``dense``, minus the terminal-punctuation check
  (Thai and Lao end sentences without punctuation).
"""

from __future__ import annotations

import regex
from datatrove.utils.word_tokenizers import WhitespaceTokenizer


# Scripts written without spaces between words. "Dense": one character ≈ one syllable or morpheme → one token per
# character. "Unspaced": abugidas whose vowel signs are combining marks → one token per letter + its marks.
_DENSE_CLASS = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Bopomofo}\p{Yi}"
_UNSPACED_CLASS = (r"\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}\p{Balinese}\p{Javanese}\p{Tai_Tham}"
                   r"\p{Tai_Le}\p{New_Tai_Lue}\p{Tai_Viet}")
_ALPHABETIC_CLASS = r"\p{Latin}\p{Cyrillic}\p{Greek}\p{Armenian}\p{Georgian}"
# Spaced scripts: a word is a run of letters, marks, digits and ZWNJ/ZWJ (Persian, Indic); every other visible
# character is a token of its own (like spaCy, "don't" → don ' t). ZWSP and BOM are separators.
_WORD_CLASS = r"\p{L}\p{M}\p{N}\u200c\u200d"
_OTHER = rf"[^\s{_WORD_CLASS}\u200b\ufeff]"
_SPACED_TOKEN = regex.compile(rf"[{_WORD_CLASS}]+|{_OTHER}")
# Text with unspaced-script characters: those come first, and a word never runs into them ("iPhone手机").
_MIXED_TOKEN = regex.compile(
    rf"[{_DENSE_CLASS}]"  # one token per Han/Kana character
    rf"|[{_UNSPACED_CLASS}]\p{{M}}*"  # one token per Thai/Lao/Khmer/... letter with its combining marks
    rf"|(?:(?![{_DENSE_CLASS}{_UNSPACED_CLASS}])[{_WORD_CLASS}])+|{_OTHER}"
)
_HAS_UNSPACED = regex.compile(rf"[{_DENSE_CLASS}{_UNSPACED_CLASS}]")
_LETTER_CLASSES = {
    "dense": regex.compile(rf"[{_DENSE_CLASS}]"),
    "unspaced": regex.compile(rf"[{_UNSPACED_CLASS}]"),
    "alphabetic": regex.compile(rf"[{_ALPHABETIC_CLASS}]"),
    "letter": regex.compile(r"\p{L}"),
}

DENSE_SCRIPTS = frozenset({"Hani", "Hans", "Hant", "Jpan", "Hira", "Kana", "Hrkt", "Bopo", "Yiii"})
UNSPACED_SCRIPTS = frozenset({"Thai", "Laoo", "Khmr", "Mymr", "Tibt", "Bali", "Java", "Lana", "Tale", "Talu", "Tavt"})
ALPHABETIC_SCRIPTS = frozenset({"Latn", "Cyrl", "Grek", "Armn", "Geor"})
SPACED_SCRIPTS = frozenset({"Arab", "Hebr", "Deva", "Beng", "Guru", "Gujr", "Orya", "Taml", "Telu", "Knda", "Mlym",
                            "Sinh", "Ethi", "Hang", "Kore", "Syrc", "Thaa", "Tfng", "Cans", "Cher", "Olck", "Mtei"})
PROFILES = ("english", "alphabetic", "spaced", "dense", "unspaced")


class ScriptAwareWordTokenizer(WhitespaceTokenizer):
    """datatrove ``WordTokenizer`` that needs no model, no download and no language: the unit of a token follows
    each character's script (see the module docstring). Sentence splitting is datatrove's own regex (inherited
    from ``WhitespaceTokenizer``, which only needs spaCy for words)."""

    def word_tokenize(self, text: str) -> list[str]:
        # the plain pattern is ~2x faster; most text has no unspaced-script character at all
        return (_MIXED_TOKEN if _HAS_UNSPACED.search(text) else _SPACED_TOKEN).findall(text)


WORD_TOKENIZER = ScriptAwareWordTokenizer()


def detect_profile(text: str) -> str:
    """The script profile of a text from its letters (first 4,000 characters): for ``und`` and unknown codes."""
    sample = text[:4000]
    counts = {k: len(p.findall(sample)) for k, p in _LETTER_CLASSES.items()}
    letters = max(counts["letter"], 1)
    if counts["dense"] / letters >= 0.3:  # Japanese and Chinese often carry Latin words: CJK still needs char tokens
        return "dense"
    if counts["unspaced"] / letters >= 0.3:
        return "unspaced"
    if counts["alphabetic"] / letters >= 0.5:
        return "alphabetic"
    return "spaced"


def script_profile(declared_lang: str | None, text: str) -> str:
    """The filter profile of a document: from the script of its declared ``lang_Scrp`` code, else from its text."""
    lang, _, script = (declared_lang or "und").partition("_")
    if script in DENSE_SCRIPTS:
        return "dense"
    if script in UNSPACED_SCRIPTS:
        return "unspaced"
    if script in ALPHABETIC_SCRIPTS:
        return "english" if lang == "eng" else "alphabetic"
    if script in SPACED_SCRIPTS:
        return "spaced"
    profile = detect_profile(text)  # und, Zzzz/Zyyy, malformed or unlisted codes
    return "english" if lang == "eng" and profile == "alphabetic" else profile
