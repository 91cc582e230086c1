"""Small renderers for tables and plots shown as asset metadata and in reports (Markdown, base64 PNG)."""

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


def png_markdown(fig, alt: str) -> str:
    """Embed a matplotlib figure as a base64 PNG in Markdown (Dagster renders it in the asset's metadata)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


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
