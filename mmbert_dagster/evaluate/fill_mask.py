"""Fill-mask probes: held-out sentences with one function word masked, run through transformers' pipeline.

Three sentences per language, taken verbatim from UDHR articles 25-30 (held out: no stage trains on them), each
with a word masked that its context decides: the preposition after "right" ("Everyone has the right [MASK]
education." -> "to"), the conjunction between two nouns ("Motherhood [MASK] childhood ..." -> "and"), a
genitive or another preposition ("... principles [MASK] the United Nations." -> "of"). No answer is a token
that a context-free model ranks high in every language ("de", "en"). A small model learns these long before
content words, so the probes separate "has learned the languages' grammar" from "predicts frequent tokens": a
model at the unigram plateau answers "." / "," / "de" everywhere and hits none (measured on the tiny preset).
A hit = the expected word in the top 5; a language is *filled* when one of its sentences is hit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROBES: dict[str, list[tuple[str, str]]] = {
    "eng_Latn": [("Everyone has the right [MASK] education.", "to"),
                 ("Motherhood [MASK] childhood are entitled to special care and assistance.", "and"),
                 (("These rights and freedoms may in no case be exercised contrary to the purposes and principles "
                   "[MASK] the United Nations."), "of")],
    "deu_Latn": [("Jeder hat das Recht [MASK] Bildung.", "auf"),
                 ("Mütter [MASK] Kinder haben Anspruch auf besondere Fürsorge und Unterstützung.", "und"),
                 (("Diese Rechte und Freiheiten dürfen in keinem Fall im Widerspruch zu den Zielen und Grundsätzen "
                   "[MASK] Vereinten Nationen ausgeübt werden."), "der")],
    "fra_Latn": [("Toute personne a droit [MASK] l’éducation.", "à"),
                 ("La maternité [MASK] l’enfance ont droit à une aide et à une assistance spéciales.", "et"),
                 (("Ces droits et libertés ne pourront, en aucun cas, s’exercer contrairement aux buts et aux "
                   "principes [MASK] Nations Unies."), "des")],
    "spa_Latn": [("Toda persona tiene derecho [MASK] la educación.", "a"),
                 ("La maternidad [MASK] la infancia tienen derecho a cuidados y asistencia especiales.", "y"),
                 (("Toda persona tiene deberes respecto [MASK] la comunidad, puesto que sólo en ella puede "
                   "desarrollar libre y plenamente su personalidad."), "a")],
    "por_Latn": [("Toda a pessoa tem direito [MASK] educação.", "à"),
                 ("A maternidade [MASK] a infância têm direito a ajuda e a assistência especiais.", "e"),
                 (("Em caso algum estes direitos e liberdades poderão ser exercidos contrariamente aos fins e aos "
                   "princípios [MASK] Nações Unidas."), "das")],
    "nld_Latn": [("Een ieder heeft recht [MASK] onderwijs;", "op"),
                 ("Moeder en kind hebben recht [MASK] bijzondere zorg en bijstand.", "op"),
                 (("Deze rechten en vrijheden mogen in geen geval worden uitgeoefend in strijd met de doeleinden en"
                   " beginselen [MASK] de Verenigde Naties."), "van")],
    "pol_Latn": [("Każdy człowiek ma prawo [MASK] nauki.", "do"),
                 ("Matka [MASK] dziecko mają prawo do specjalnej opieki i pomocy.", "i"),
                 (("Wszystkie dzieci, zarówno małżeńskie jak [MASK] pozamałżeńskie, korzystają z jednakowej ochrony"
                   " społecznej."), "i")],
    "rus_Cyrl": [("Каждый человек имеет право [MASK] образование.", "на"),
                 ("Материнство [MASK] младенчество дают право на особое попечение и помощь.", "и"),
                 (("Все дети, родившиеся в браке [MASK] вне брака, должны пользоваться одинаковой социальной "
                   "защитой."), "или")],
}
TOP_K = 5


@dataclass
class ProbeResult:
    lang: str
    sentence: str
    expected: str
    guesses: list[tuple[str, float]]

    @property
    def hit(self) -> bool:
        return any(g.strip().lower() == self.expected.lower() for g, _ in self.guesses)


def run_probes(model_dir: Path | str, probes: dict[str, list[tuple[str, str]]] | None = None, *,
               device: str = "cpu") -> list[ProbeResult]:
    """Every probe through ``pipeline("fill-mask")`` on ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(model_dir), tokenizer=str(model_dir), device=device, top_k=TOP_K)
    out = []
    for lang, sentences in (probes or PROBES).items():
        for sentence, expected in sentences:
            guesses = [(p["token_str"].strip(), float(p["score"])) for p in fill(sentence)]
            out.append(ProbeResult(lang, sentence, expected, guesses))
    return out


def save_results(results: list[ProbeResult], path: Path) -> None:
    """Probe results as JSON (lang, sentence, expected, hit, top5) — what the training assets keep."""
    path.write_text(json.dumps([{"lang": r.lang, "sentence": r.sentence, "expected": r.expected, "hit": r.hit,
                                 "top5": r.guesses} for r in results], indent=1, ensure_ascii=False))


def load_results(path: Path) -> list[ProbeResult]:
    return [ProbeResult(p["lang"], p["sentence"], p["expected"], [(g, s) for g, s in p["top5"]])
            for p in json.loads(path.read_text())]


def languages_filled(results: list[ProbeResult]) -> list[str]:
    """Languages with at least one probe hit, in probe order."""
    return list(dict.fromkeys(r.lang for r in results if r.hit))


def probes_markdown(results: list[ProbeResult]) -> str:
    rows = [f"| {r.lang} | {r.sentence} | {r.expected} | {'✓' if r.hit else '✗'} | "
            + ", ".join(f"{g!r} ({s:.2f})" for g, s in r.guesses) + " |" for r in results]
    return "| lang | sentence | expected | hit | top 5 |\n|---|---|---|---|---|\n" + "\n".join(rows)
