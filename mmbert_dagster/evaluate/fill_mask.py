"""Fill-mask probes: one masked word per language, with the expected answer, run through transformers' pipeline.

The probes are held-out sentences (UDHR article 26, which no stage trains on) whose masked word is a function
word the context decides ("the right [MASK] education" -> "to"): a small model learns these long before it
learns content words, so the probe separates "learned the languages' grammar" from "predicts frequent tokens"
(a model at the unigram plateau answers "." / "," everywhere). A hit = the expected word in the top 5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROBES: dict[str, tuple[str, str]] = {
    "eng_Latn": ("Everyone has the right [MASK] education.", "to"),
    "deu_Latn": ("Jeder hat das Recht [MASK] Bildung.", "auf"),
    "fra_Latn": ("Toute personne a droit [MASK] l'éducation.", "à"),
    "spa_Latn": ("Toda persona tiene derecho [MASK] la educación.", "a"),
    "por_Latn": ("Toda a pessoa tem direito [MASK] educação.", "à"),
    "nld_Latn": ("Een ieder heeft recht [MASK] onderwijs.", "op"),
    "pol_Latn": ("Każdy człowiek ma prawo [MASK] nauki.", "do"),
    "rus_Cyrl": ("Каждый человек имеет право [MASK] образование.", "на"),
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


def run_probes(model_dir: Path | str, probes: dict[str, tuple[str, str]] | None = None) -> list[ProbeResult]:
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(model_dir), tokenizer=str(model_dir), device="cpu", top_k=TOP_K)
    out = []
    for lang, (sentence, expected) in (probes or PROBES).items():
        guesses = [(p["token_str"].strip(), float(p["score"])) for p in fill(sentence)]
        out.append(ProbeResult(lang, sentence, expected, guesses))
    return out


def probes_markdown(results: list[ProbeResult]) -> str:
    rows = [f"| {r.lang} | {r.sentence} | {r.expected} | {'✓' if r.hit else '✗'} | "
            + ", ".join(f"{g!r} ({s:.2f})" for g, s in r.guesses) + " |" for r in results]
    return "| lang | sentence | expected | hit | top 5 |\n|---|---|---|---|---|\n" + "\n".join(rows)
