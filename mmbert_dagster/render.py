"""Small renderers for tables and plots shown as asset metadata and in reports (Markdown, base64 PNG); the run
report itself is `evaluate/report.py`."""

from __future__ import annotations

import base64
import io

import polars as pl


def md_table(df: pl.DataFrame, max_rows: int = 30, float_digits: int = 4) -> str:
    """A Markdown table of the first ``max_rows`` rows (floats rounded), with a note when rows were cut."""
    shown = df.head(max_rows)
    cols = shown.columns

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.{float_digits}g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in shown.iter_rows()]
    if df.height > max_rows:
        lines.append(f"\n_{df.height - max_rows} more rows not shown_")
    return "\n".join(lines)


def png_bytes(fig) -> bytes:
    """The figure as PNG bytes (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def png_markdown(fig, alt: str) -> str:
    """Embed a matplotlib figure as a base64 PNG in Markdown (Dagster renders it in the asset's metadata)."""
    return inline_png(png_bytes(fig), alt)


def inline_png(png: bytes, alt: str) -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bar_chart(groups: list[str], series: dict[str, list[float]], title: str, ylabel: str,
                      hline: float | None = None, hline_label: str = ""):
    """Bars of several series side by side per group (e.g. models per tier); optional reference line (chance)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) / 3), 3.4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))], values, width, label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1, label=hline_label or None)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return fig


def multi_line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str):
    """Several (x, y) curves on one plot (e.g. the loss of every stage against cumulative tokens)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    for name, (x, y) in series.items():
        ax.plot(x, y, label=name, linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def bar_chart(labels: list[str], values: list[float], title: str, ylabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels)), 3.2))
    ax.bar(range(len(labels)), values, color="#4C72B0")
    ax.set_xticks(range(len(labels)), labels, rotation=75, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def bar_chart_md(df: pl.DataFrame, label: str, value: str, title: str, ylabel: str) -> str:
    """A bar chart of ``df[value]`` by ``df[label]`` as embeddable Markdown."""
    return png_markdown(bar_chart(df[label].to_list(), df[value].to_list(), title, ylabel), title)


def line_chart_md(values: list[float], title: str, xlabel: str, ylabel: str) -> str:
    """A line plot of ``values`` against their index as embeddable Markdown (loss curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    ax.plot(range(1, len(values) + 1), values, color="#C44E52")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return png_markdown(fig, title)


def delta_chart(frame: pl.DataFrame, title: str, ylabel: str):
    """Per-language differences with their intervals (``frame``: lang, tier, delta, low, high), sorted by delta,
    coloured by tier, with a line at 0 (no difference)."""
    plt = _plt()
    tier_colours = {"english": "#4C72B0", "high": "#55A868", "mid": "#8172B2", "low": "#C44E52", "unseen": "#937860"}
    rows = frame.sort("delta", "lang")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * rows.height), 3.4))
    x = list(range(rows.height))
    delta, low, high = rows["delta"].to_list(), rows["low"].to_list(), rows["high"].to_list()
    tiers = rows["tier"].to_list()
    extra = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    order = list(tier_colours)
    present = sorted(set(tiers), key=lambda t: (order.index(t) if t in order else len(order), t))
    colours = {t: tier_colours.get(t) or next(extra, "grey") for t in present}  # legend in tier order
    for tier, colour in colours.items():
        idx = [i for i, t in enumerate(tiers) if t == tier]
        ax.errorbar([x[i] for i in idx], [delta[i] for i in idx],
                    yerr=[[delta[i] - low[i] for i in idx], [high[i] - delta[i] for i in idx]],
                    fmt="o", markersize=3.5, capsize=2, linewidth=1, color=colour, label=tier)
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, rows["lang"].to_list(), rotation=75, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if colours:
        ax.legend(fontsize=7, title="tier", title_fontsize=7)
    return fig
