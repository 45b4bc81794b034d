"""The report's page layout (A4 pages of matplotlib figures, no LaTeX): a page with a table
area over a figure area, monospace text tables and text blocks, ruled tables with wrapped cells,
and a saved figure embedded with its caption. Shared by :mod:`analysis.report` (Phase 1) and
:mod:`analysis.report_phase2`.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from .figures import FIGURES, saved_caption

PAGE = (8.27, 11.69)  # A4 portrait, inches
MAX_ROWS = 22  # table rows per page; the rest are in the Parquet tables


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if v == "inf":
        return "inf"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def fmt_ci(c) -> str:
    return "-" if not c or c[0] is None else f"[{fmt(c[0])}, {fmt(c[1])}]"


def text_table(ax, header: list[str], rows: list[list], title: str, note_more: str = "", max_rows: int = MAX_ROWS,
               empty: str = "(nothing measured)", note: str | None = None) -> None:
    """A fixed-width text table (monospace: columns line up whatever the content), with an
    optional ``note`` line above the header (under the title, never over it)."""
    cells = [[fmt(v) for v in r] for r in rows[:max_rows]]
    caps = [28] * (len(header) - 1) + [64]  # the last column may hold a sentence
    widths = [min(max([len(h)] + [len(r[i]) for r in cells]), cap) for i, (h, cap) in enumerate(zip(header, caps))]

    def line(vals):
        return "  ".join(str(v)[:w].ljust(w) for v, w in zip(vals, widths))

    out = ([note, ""] if note else []) + [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
    if not rows:
        out.append(empty)
    elif len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more rows{note_more}")
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=9, fontweight="bold")
    size = 6.5 if sum(widths) + 2 * len(widths) < 125 else 5.5
    ax.text(0, 1, "\n".join(out), va="top", ha="left", fontsize=size, family="monospace", transform=ax.transAxes)


def text_lines(ax, lines: list[str], title: str | None = None, size: float = 8) -> None:
    ax.axis("off")
    if title:
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
    out = [w for line in lines for w in (textwrap.wrap(line, 120, subsequent_indent="    ") or [""])]
    ax.text(0, 1, "\n".join(out), va="top", ha="left", fontsize=size, family="monospace", transform=ax.transAxes)


def share_for_table(n_rows: int, extra_lines: int = 0) -> float:
    """The share of the page's body a table of ``n_rows`` needs (header, rule, a "more rows" line
    and ``extra_lines`` included), so that the figure starts right under it."""
    lines = min(n_rows, MAX_ROWS) + 3 + extra_lines
    inches = lines * 6.5 * 1.2 / 72  # 6.5 pt monospace, matplotlib's line spacing 1.2
    return min(0.45, inches / (PAGE[1] * 0.9) + 0.04)


def titled_page(title: str, size: int = 13) -> Figure:
    """An empty A4 page with its title at the top left."""
    fig = Figure(figsize=PAGE)
    fig.suptitle(title, fontsize=size, x=0.05, ha="left", y=0.985)
    return fig


def new_page(title: str, table_share: float = 0.45) -> tuple[Figure, list]:
    """A page with its title, a table area on top (``table_share`` of the body) and a figure
    area under it."""
    fig = titled_page(title)
    top = fig.add_axes((0.05, 1 - 0.05 - table_share * 0.9, 0.9, table_share * 0.9))
    bottom = fig.add_axes((0.05, 0.06, 0.9, 0.9 * (1 - table_share) - 0.06))
    return fig, [top, bottom]


def figure_into(ax, name: str, a: dict) -> str:
    """Figure ``name`` as an image inside ``ax`` (the PNG already saved beside the analysis
    when there is one, with the caption saved in it; else drawn now); returns its caption."""
    import io

    import matplotlib.image as mpimg

    saved = Path(a["_figures_dir"]) / f"{name}.png" if a.get("_figures_dir") else None
    caption = saved_caption(saved) if saved is not None and saved.is_file() else None
    if caption is None:  # not saved, or saved without its caption: drawn (again), for its caption
        fig, caption = FIGURES[name](a)  # the caption always comes from the data
    if saved is not None and saved.is_file():
        img = mpimg.imread(saved)
    else:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=150)
        buf.seek(0)
        img = mpimg.imread(buf)
    ax.imshow(img)
    ax.set_anchor("N")  # the image (shrunk to its aspect) and its caption sit at the top of the area
    ax.axis("off")
    ax.text(0, -0.02, "\n".join(textwrap.wrap(f"Figure ({name}): {caption}", 130)), fontsize=7, va="top",
            transform=ax.transAxes)
    return caption


def wrapped(text: str, width: int = 150) -> tuple[str, int]:
    """``text`` wrapped to ``width`` characters, and its number of lines."""
    lines = textwrap.wrap(text, width)
    return "\n".join(lines), len(lines)


def grid_table(ax, header: list[str], rows: list[list[str]], widths: list[float], top: float,
               size: float = 7.0) -> float:
    """A ruled table in ``ax`` (proportional font, each cell's text wrapped to its column;
    ``widths``: fractions of the axes' width) with its top edge at ``top`` (axes fraction).
    Returns its bottom edge, for what comes under it."""
    from matplotlib.table import Table

    fw, fh = ax.figure.get_size_inches()
    box = ax.get_position()
    w_in, h_pt = box.width * fw, box.height * fh * 72
    chars = [max(4, int(w * w_in * 72 / (0.56 * size)) - 2) for w in widths]  # ~0.56 em per character
    cells = [[textwrap.fill(str(v), n) or " " for v, n in zip(r, chars)] for r in [header, *rows]]
    heights = [(max(c.count("\n") + 1 for c in r) * 1.25 * size + 0.6 * size) / h_pt for r in cells]
    table = Table(ax, bbox=(0, top - sum(heights), 1, sum(heights)))
    for i, (r, h) in enumerate(zip(cells, heights)):
        for j, (text, w) in enumerate(zip(r, widths)):
            cell = table.add_cell(i, j, w, h, text=text, loc="left", facecolor="0.88" if i == 0 else "white",
                                  edgecolor="0.6")
            cell.PAD = 0.05 / (w * w_in)  # 0.05 inch either side, whatever the column's width
            cell.set_linewidth(0.5)
            cell.get_text().set_fontweight("bold" if i == 0 else "normal")
    table.auto_set_font_size(False)
    table.set_fontsize(size)
    ax.add_table(table)
    return top - sum(heights)
