"""An HTML page of what a spec does, for a reviewer to open from a CI artifact: `prunespec show --format html`.

Start with `render_html`. The page is self-contained and loads nothing: inline CSS, inline SVG, no scripts, no
fonts, and a Content-Security-Policy that forbids any request, so it looks the same offline and inside a sandboxed
artifact viewer. It shows the header totals (parameters and MACs before → after), a bar chart with one row per
touched layer (input channels, output channels and MACs, before and after; rows scroll, so a model with hundreds of
layers stays readable), the requested channels the planner kept and why, the activation subselections (which
layers gather, which slice), and the full per-layer table that `show` prints as text. Every piece of text from the
spec goes through `html.escape`. The numbers come from `prunespec.review.layer_rows`, like the other formats.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from prunespec.review import (
    PREDATES_LAYER_MACS,
    LayerRow,
    describe_mode,
    layer_rows,
    layer_table,
    predates_layer_macs,
    relative_change,
    unit_lines,
)
from prunespec.schemas import PruningSpec, decode_runs

ROW = 18  # pixels per layer in the chart
BAR = 12
LABEL_CHARACTER = 7.2  # width of one character of the 12px monospace labels
PANELS = (("input channels", "#2f6fb0"), ("output channels", "#2f6fb0"), ("MACs", "#c2571a"))
PANEL_BAR = 190
PANEL_TEXT = 110
PANEL = PANEL_BAR + PANEL_TEXT
MARKER = 22  # the column of gather / slice dots between the names and the panels
BEFORE = "#d5dbe1"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; margin: 24px;
       max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.mode { color: #59636e; margin: 0 0 12px; }
.totals { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 0; }
.totals dt { color: #59636e; } .totals dd { margin: 0; font-variant-numeric: tabular-nums; }
.note { color: #9a6700; }
.legend span { display: inline-block; width: 12px; height: 12px; vertical-align: -1px; margin: 0 4px 0 12px; }
.scroll { max-height: 75vh; overflow: auto; border: 1px solid #d1d9e0; border-radius: 6px; }
svg.chart { display: block; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #1f2328; }
svg text.layer { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
svg text.head { font-weight: 600; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d1d9e0; padding: 3px 8px; text-align: left; vertical-align: baseline; }
th { background: #f6f8fa; }
td.indices { font-family: ui-monospace, monospace; font-size: 12px; word-break: break-all; max-width: 520px; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
.gather { color: #cf222e; font-weight: 600; } .slice { color: #1a7f37; }
"""


def _short(n: int) -> str:
    """A count in three significant digits with a unit, for the chart's labels.

    >>> _short(999), _short(1_200), _short(15_560_960)
    ('999', '1.2k', '15.6M')
    """
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.3g}{unit}"
    return str(n)


def _count(n: int, noun: str) -> str:
    """
    >>> _count(1, "gather"), _count(3, "slice")
    ('1 gather', '3 slices')
    """
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _pair(pair: tuple[int, int] | None, short: bool) -> str:
    if pair is None:
        return "–"
    before, after = (_short(n) if short else f"{n:,}" for n in pair)
    return before if pair[0] == pair[1] else f"{before} → {after}"


def _text(x: float, y: float, content: str, css: str = "") -> str:
    css = f' class="{css}"' if css else ""
    return f'<text x="{x:.1f}" y="{y:.1f}"{css}>{html.escape(content)}</text>'


def _label_width(rows: list[LayerRow]) -> float:
    """Room for the longest layer name, up to a limit (longer names lose their start)."""
    return min(max((len(r.name) for r in rows), default=10) * LABEL_CHARACTER + 16, 360)


def _chart(rows: list[LayerRow]) -> str:
    """One SVG: a row per layer, and per row a panel for input channels, output channels and MACs.

    In each panel the light bar is the size before pruning and the dark bar over it the size after, both on the
    panel's own linear scale (its largest size before), so a row shows what fraction the layer keeps.
    """
    label = _label_width(rows)
    width = label + MARKER + PANEL * len(PANELS)
    height = ROW * len(rows) + 4
    values = [[r.inputs for r in rows], [r.outputs for r in rows], [r.macs for r in rows]]
    scales = [max((p[0] for p in column if p), default=0) or 1 for column in values]
    parts = [
        f'<svg class="chart" id="layer-chart" role="img" aria-label="channels and MACs per layer, before and after"'
        f' width="{width:.0f}" height="{height}" viewBox="0 0 {width:.0f} {height}">'
    ]
    fits = int((label - 16) / LABEL_CHARACTER)
    for i, row in enumerate(rows):
        y = i * ROW + 2
        parts.append(f'<g class="layer-row"><title>{html.escape(_describe(row))}</title>')
        if i % 2:
            parts.append(f'<rect x="0" y="{y}" width="{width:.0f}" height="{ROW}" fill="#f6f8fa"/>')
        name = row.name if len(row.name) <= fits else "…" + row.name[len(row.name) - fits + 1 :]
        parts.append(_text(6, y + 13, name, "layer"))
        if row.subselection:
            colour = "#cf222e" if row.subselection == "gather" else "#1a7f37"
            fill = colour if row.subselection == "gather" else "none"
            parts.append(
                f'<circle cx="{label + 8:.1f}" cy="{y + ROW / 2}" r="4.5" fill="{fill}" stroke="{colour}" '
                f'stroke-width="1.5" class="{row.subselection}"/>'
            )
        for p, ((_, colour), column, scale) in enumerate(zip(PANELS, values, scales)):
            x = label + MARKER + p * PANEL
            pair = column[i]
            if pair is not None:
                top = y + (ROW - BAR) / 2
                for size, fill in ((pair[0], BEFORE), (pair[1], colour)):
                    bar = max(size / scale * PANEL_BAR, 1 if size else 0)
                    parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{bar:.1f}" height="{BAR}" fill="{fill}"/>')
            parts.append(_text(x + PANEL_BAR + 6, y + 13, _pair(pair, short=p == 2)))
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _chart_head(rows: list[LayerRow]) -> str:
    """The panel titles, as an SVG of the chart's width so that both scale alike."""
    label = _label_width(rows)
    width = label + MARKER + PANEL * len(PANELS)
    texts = [_text(6, 15, "layer", "head")]
    texts += [_text(label + MARKER + p * PANEL, 15, title, "head") for p, (title, _) in enumerate(PANELS)]
    return f'<svg class="chart" width="{width:.0f}" height="22" viewBox="0 0 {width:.0f} 22">{"".join(texts)}</svg>'


def _describe(row: LayerRow) -> str:
    """The tooltip of a chart row."""
    parts = [f"{row.name} ({row.type})"]
    for what, pair in (("inputs", row.inputs), ("outputs", row.outputs), ("MACs", row.macs)):
        if pair is not None:
            parts.append(f"{what} {_pair(pair, short=False)}")
    if row.subselection:
        parts.append(f"reads its input through a {row.subselection}")
    return "; ".join(parts)


Cell = str | tuple[str, str]  # text, or (text, CSS class)


def _table(head: list[str], body: Sequence[Sequence[Cell]]) -> str:
    """An HTML table; every cell's text is escaped here."""

    def cell(value: Cell) -> str:
        text, css = (value, "") if isinstance(value, str) else value
        return f'<td class="{css}">{html.escape(text)}</td>' if css else f"<td>{html.escape(text)}</td>"

    rows = "".join(f"<tr>{''.join(cell(v) for v in row)}</tr>" for row in body)
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{rows}</tbody></table>"


def _gathers(spec: PruningSpec, rows: list[LayerRow]) -> str:
    """Which consumers read part of their input, and how: through a gather (a copy) or a slice (a view)."""
    kinds = {r.name: r.subselection for r in rows}
    body: list[list[Cell]] = [
        [name, layer.type, (kinds[name], kinds[name]), f"{len(decode_runs(layer.input.indices))} of "
         f"{layer.input.channels}", (layer.input.indices, "indices")]
        for name, layer in spec.layers.items() if layer.input is not None
    ]  # fmt: skip
    if not body:
        return "<p>None: every consumer reads its whole input activation.</p>"
    gathers = sum(kind == "gather" for kind in kinds.values())
    intro = (
        f"<p>{_count(len(body), 'consumer')} read part of their input activation: "
        f'<span class="gather">{gathers} through a gather</span> (a memory copy at run time) and '
        f'<span class="slice">{len(body) - gathers} through a slice</span> (one contiguous run: a view, no copy).</p>'
    )
    return intro + _table(["layer", "type", "reads through", "channels read", "indices"], body)


def _kept(spec: PruningSpec) -> str:
    if not spec.kept:
        return "<p>None: the planner removed every channel that was asked for.</p>"
    intro = (
        f"<p>{_count(len(spec.kept), 'group')} of the channels or heads asked for stay in the model, because "
        "removing them would change what it computes:</p>"
    )
    body: list[list[Cell]] = [[k.tensor, k.side, (k.channels, "indices"), k.reason] for k in spec.kept]
    return intro + _table(["tensor", "side", "channels", "reason"], body)


def _units(spec: PruningSpec) -> list[str]:
    """A section for each kind of unit beyond channels: heads, norms, dropped blocks, config values."""
    return [
        f"<section><h2>{html.escape(title[:1].upper() + title[1:])}</h2><ul>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        + "</ul></section>"
        for title, lines in unit_lines(spec)
    ]


def render_html(spec: PruningSpec) -> str:
    """A self-contained HTML page of what `spec` does.

    >>> from prunespec.schemas import LayerSpec, PruningSpec, Request, Summary
    >>> spec = PruningSpec(model="Net<1>", inputs=[], request=Request([], [], False, True),
    ...     summary=Summary(296, 168, 288, 162, 0), fingerprint={"c.weight": "float32[8,4,3,3]"},
    ...     layers={"c": LayerSpec("Conv2d", {}, {"weight": ["0-5", "1-3"]}, macs=(288, 162))})
    >>> page = render_html(spec)
    >>> "<h1>Net&lt;1&gt;</h1>" in page, page.count('class="layer-row"'), "http://" in page
    (True, 1, False)
    """
    rows = layer_rows(spec)
    s = spec.summary
    gathers = sum(r.subselection == "gather" for r in rows)
    slices = sum(r.subselection == "slice" for r in rows)
    totals = [
        ("parameters", relative_change(s.parameters_before, s.parameters_after)),
        ("MACs", relative_change(s.macs_before, s.macs_after)),
        ("layers touched", f"{len(rows):,}"),
        ("activation subselections", f"{s.subselections} ({_count(gathers, 'gather')}, {_count(slices, 'slice')})"),
        ("batch norms to fold", f"{len(spec.norm_folds)} (apply --fold-norms)"),
        ("example inputs", ", ".join(f"{i.dtype}[{'x'.join(map(str, i.shape))}]" for i in spec.inputs) or "–"),
    ]
    notes = [PREDATES_LAYER_MACS] if predates_layer_macs(spec) else []
    head, body = layer_table(rows)
    escape = html.escape
    legend = (
        f'<p class="legend">One row per touched layer, in model order.<span style="background:{BEFORE}"></span>'
        f'before<span style="background:{PANELS[0][1]}"></span>channels after<span style="background:'
        f'{PANELS[2][1]}"></span>MACs after; each panel on its own scale. A filled red dot: the layer gathers its '
        "input; a hollow green one: it slices it. Hover a row for its numbers.</p>"
    )
    chart = f'{legend}{_chart_head(rows)}<div class="scroll">{_chart(rows)}</div>' if rows else "<p>No layer.</p>"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            # Forbid every request: the page must look the same with no network.
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">",
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>prunespec: {escape(spec.model)}</title>",
            f"<style>{STYLE}</style></head><body>",
            f"<header><h1>{escape(spec.model)}</h1>",
            f'<p class="mode">{escape(describe_mode(spec))} · schema {escape(spec.schema_version)} · written by '
            f"{escape(spec.generator)}</p>",
            '<dl class="totals">' + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in totals) + "</dl>",
            *(f'<p class="note">{escape(note)}</p>' for note in notes),
            "</header>",
            f'<section id="chart"><h2>Channels and MACs per layer</h2>{chart}</section>',
            *_units(spec),
            f'<section id="kept"><h2>Kept channels</h2>{_kept(spec)}</section>',
            f'<section id="gathers"><h2>Activation subselections</h2>{_gathers(spec, rows)}</section>',
            f'<section id="layers"><h2>Every touched layer</h2>{_table(head, body)}</section>',
            "</body></html>",
            "",
        ]
    )
