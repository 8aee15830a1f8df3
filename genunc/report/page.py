"""The report page: one self-contained HTML file (inline CSS, SVG and images, a few lines of
script for the score tabs), readable from disk with no network."""

from __future__ import annotations

import html
import json
from typing import Any

import numpy as np

from genunc._version import __version__
from genunc.filtering import keep_order
from genunc.report import charts
from genunc.report.evaluation import KEPT, Evaluation
from genunc.report.samples import RENDERERS, max_token_mi

#: kept fractions at which the retention curves are drawn (1% steps: the page's size does not
#: depend on the number of samples)
FRACTIONS = np.linspace(0.01, 1.0, 100)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 17px; margin-top: 28px; }
.sub { color: #666; margin-top: 0; }
table.meta td, table.meta th, table.stats td, table.stats th { padding: 2px 10px 2px 0;
       text-align: left; vertical-align: top; }
table.stats td.num, table.stats th.num { text-align: right; }
table.meta th { color: #555; font-weight: 600; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
svg .frame { fill: none; stroke: #999; } svg .grid { stroke: #eee; }
svg .tick { font-size: 10px; fill: #555; } svg .label { font-size: 11px; fill: #333; }
svg .baseline { stroke: #444; stroke-dasharray: 5 4; stroke-width: 1.5; }
svg .bars.all rect, svg .bars.pass rect { fill: #1f77b4; opacity: 0.55; }
svg .bars.fail rect { fill: #d62728; opacity: 0.55; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle;
            margin-right: 4px; }
.tabs button { font: inherit; padding: 4px 10px; margin: 0 4px 4px 0; border: 1px solid #bbb;
               background: #f6f6f6; border-radius: 4px; cursor: pointer; }
.tabs button.on { background: #1f77b4; color: white; border-color: #1f77b4; }
section.score { display: none; } section.score.on { display: block; }
.extremes { display: flex; gap: 28px; flex-wrap: wrap; }
.extremes > div { flex: 1 1 480px; }
.cards { display: flex; flex-wrap: wrap; gap: 8px; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 4px; font-size: 11px;
        max-width: 200px; } .card.fail { border-color: #d62728; }
.card .cap span { display: block; }
.meta-grid { display: grid; grid-template-columns: 1fr 1fr;
        column-gap: 32px; }
.card .cap { color: #555; } .card .cap b { color: #222; }
img.tile { width: 72px; height: 72px; image-rendering: pixelated; display: block; }
.molecule svg { display: block; } table.props { font-size: 11px; }
table.props th { text-align: left; color: #555; font-weight: normal; padding-right: 6px; }
table.props td { max-width: 170px; overflow-wrap: anywhere; }
p.text { font-family: ui-monospace, monospace; margin: 2px 0; white-space: pre-wrap; }
.prompt { color: #777; } .token { border-radius: 2px; }
.note { color: #888; font-style: italic; }
.certificate { border-left: 4px solid #2ca02c; padding: 6px 12px; background: #f3faf3; }
.certificate.none { border-color: #d62728; background: #fdf3f3; }
"""

SCRIPT = """
document.querySelectorAll('.tabs button').forEach(function (button) {
  button.addEventListener('click', function () {
    document.querySelectorAll('.tabs button, section.score').forEach(function (el) {
      el.classList.toggle('on', el.dataset.score === button.dataset.score);
    });
  });
});
window.addEventListener('load', function () {
  document.body.dataset.loadMs = performance.now().toFixed(1);
});
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _meta_table(rows: list[tuple[str, Any]]) -> str:
    return '<table class="meta">' + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows
        if v is not None) + "</table>"


def _meta_grid(rows: list[tuple[str, Any]]) -> str:
    """Two tables side by side: the run's rows split in halves."""
    rows = [row for row in rows if row[1] is not None]
    half = (len(rows) + 1) // 2
    return f'<div class="meta-grid">{_meta_table(rows[:half])}{_meta_table(rows[half:])}</div>'


def run_metadata(metadata: dict[str, Any], n: int) -> list[tuple[str, Any]]:
    """What made the export: model, posterior, seed, config digest."""
    config = metadata.get("config") or {}
    generate = config.get("generate") or {}
    posterior = metadata.get("posterior_summary") or {}
    rows: list[tuple[str, Any]] = [
        ("modality", metadata.get("modality")), ("model", metadata.get("model")),
        ("samples", n), ("seed", generate.get("seed")), ("draws (M)", generate.get("num_draws")),
        ("scores", ", ".join(generate.get("scores") or []) or None)]
    for key in ("structure", "head", "tail", "n_params", "prior_precision", "sigma_noise"):
        if key in posterior:
            value = posterior[key]
            rows.append((f"posterior {key}", value if not isinstance(value, (dict, list))
                         else json.dumps(value)))
    fingerprint = metadata.get("posterior_fingerprint")
    if isinstance(fingerprint, dict):
        fingerprint = ", ".join(f"{k}: {v}" for k, v in fingerprint.items()
                                if k in ("head_name", "head_class", "weights_sha256"))
    rows += [("posterior fingerprint", fingerprint),
             ("config sha256", (metadata.get("config_sha256") or "")[:16] or None)]
    source = metadata.get("filtered_from")
    if source:
        rows.append(("filtered from", source))
    return rows


def certificate(metadata: dict[str, Any]) -> str:
    """The risk-control certificate of a filtered export (``genunc filter --risk-alpha``)."""
    control = (metadata.get("filter") or {}).get("risk_control")
    if not control:
        return ""
    if control["certified"]:
        head = (f"keep score ≤ {control['threshold']:.6g}: with probability ≥ "
                f"{1 - control['delta']:g}, at most {control['alpha']:.1%} of kept samples fail "
                f"({html.escape(control['method'])})")
        css = "certificate"
    else:
        head = (f"no threshold certifies a failure rate ≤ {control['alpha']:g} at confidence "
                f"{1 - control['delta']:g}: nothing kept")
        css = "certificate none"
    rows = [("failure", control.get("failure")), ("calibration samples", control["n_calibration"]),
            ("kept on calibration", control["kept_calibration"]),
            ("failures kept on calibration", control["failures_kept_calibration"]),
            ("p-value", control["p_value"]),
            ("calibration export", control.get("calibration_export"))]
    return (f'<h2>Risk control</h2><div class="{css}" id="certificate"><p><b>{head}</b></p>'
            f"{_meta_table(rows)}</div>")


def stats_table(evaluation: Evaluation) -> str:
    """The table ``genunc evaluate`` prints, with the same rounding."""
    head = ("<tr><th>score</th><th class=num>Spearman</th><th class=num>AUROC</th>"
            f"<th class=num>AURC</th><th class=num>q@{KEPT:.0%}</th></tr>")
    body = "".join(
        f'<tr data-score="{html.escape(r.name)}"><td>{html.escape(r.name)}</td>'
        f'<td class="num spearman">{r.spearman:.3f}</td><td class="num auroc">{r.auroc:.3f}</td>'
        f'<td class="num aurc">{r.area_under_retention:.3f}</td>'
        f'<td class="num kept">{r.quality_kept:.3f}</td></tr>' for r in evaluation.rows)
    return f'<table class="stats" id="stats">{head}{body}</table>'


def _legend(names: list[str]) -> str:
    items = "".join(f'<span><i style="background:{charts.PALETTE[k % 10]}"></i>'
                    f"{html.escape(n)}</span>" for k, n in enumerate(names))
    return (f'<p class="legend">{items}<span><i style="background:#444"></i>random ranking '
            "(expected)</span></p>")


def _cards(export, indices: np.ndarray, score: np.ndarray, evaluation: Evaluation | None,
           context: dict[str, Any]) -> str:
    render = RENDERERS[export.format]
    cards = []
    for i in indices:
        record = export.records[int(i)]
        failed = evaluation is not None and evaluation.failed is not None and \
            bool(evaluation.failed[int(i)])
        quality = "" if evaluation is None else "<span>" + (
            "fails" if failed else "passes" if evaluation.failed is not None else
            f"{html.escape(evaluation.quality_column)} {evaluation.quality[int(i)]:.3g}") + \
            "</span>"
        cards.append(f'<div class="card{" fail" if failed else ""}" '
                     f'data-sample="{html.escape(record["sample_id"])}">'
                     f"{render(export.path(record), record, context)}"
                     f'<div class="cap"><span><b>{html.escape(record["sample_id"])}</b> '
                     f"{score[int(i)]:.4g}</span>{quality}</div></div>")
    return '<div class="cards">' + "".join(cards) + "</div>"


def render(export, names: list[str], evaluation: Evaluation | None, extremes: int) -> str:
    """The whole page for `export`: `names` are the score columns shown, `extremes` the number
    of most and least uncertain samples per score."""
    scores = evaluation.scores if evaluation is not None else \
        {name: export.column(name).astype(float) for name in names}
    n = len(export)
    k = min(extremes, n)
    orders = {name: keep_order(values) for name, values in scores.items()}
    chosen = {name: (order[:k], order[::-1][:k]) for name, order in orders.items()}
    context: dict[str, Any] = {}
    if export.format == "json":
        shown = {int(i) for low, high in chosen.values() for i in np.concatenate([low, high])}
        context["max_token_mi"] = max_token_mi([export.path(export.records[i]) for i in shown])
    metadata = export.metadata
    title = f"{metadata.get('model', export.directory.name)}, {n} {metadata.get('modality', '')}" \
        " samples"
    parts = [f"<h1>genunc report: {html.escape(title)}</h1>",
             f'<p class="sub">{n} {html.escape(str(metadata.get("modality", "")))} samples in '
             f"<code>{html.escape(str(export.directory))}</code>"
             + ("" if evaluation is None else
                f"; quality column <b>{html.escape(evaluation.quality_column)}</b> (mean "
                f"{evaluation.quality.mean():.3f}; AUROC: {html.escape(evaluation.rule)})")
             + "</p>"]
    parts.append(certificate(metadata))
    if evaluation is not None:
        curves = {name: evaluation.retention(name, FRACTIONS) for name in scores}
        chart = charts.line_chart(curves, baseline=float(evaluation.quality.mean()),
                                  x_label="fraction kept (least uncertain first)",
                                  y_label=f"mean {evaluation.quality_column} of kept",
                                  title="retention curves")
        parts.append('<h2>Scores against quality</h2><div class="row"><div>'
                     f"{stats_table(evaluation)}<p class=note>the numbers of "
                     f"<code>genunc evaluate --quality {html.escape(evaluation.quality_column)}"
                     f"</code></p></div><div id=retention>{chart}{_legend(list(scores))}</div>"
                     "</div>")
    else:
        parts.append('<p class="note">no quality column: no retention curves '
                     "(give --quality COLUMN)</p>")
    tabs = "".join(f'<button data-score="{html.escape(name)}"{" class=on" if j == 0 else ""}>'
                   f"{html.escape(name)}</button>" for j, name in enumerate(scores))
    parts.append(f'<h2>Samples by score</h2><div class="tabs">{tabs}</div>')
    for j, (name, values) in enumerate(scores.items()):
        low, high = chosen[name]
        failed = None if evaluation is None else evaluation.failed
        hist = charts.histogram(values, failed, x_label=name, title=f"distribution of {name}")
        split = "" if failed is None else \
            ('<p class="legend"><span><i style="background:#1f77b4"></i>pass</span>'
             '<span><i style="background:#d62728"></i>fail</span></p>')
        parts.append(
            f'<section class="score{" on" if j == 0 else ""}" data-score="{html.escape(name)}">'
            f'<div class="row"><div>{hist}{split}</div></div><div class="extremes">'
            f'<div class="least"><h3>least uncertain {k}</h3>'
            f"{_cards(export, low, values, evaluation, context)}</div>"
            f'<div class="most"><h3>most uncertain {k}</h3>'
            f"{_cards(export, high, values, evaluation, context)}</div></div></section>")
    parts.append("<h2>Run</h2>" + _meta_grid(run_metadata(metadata, n)))
    parts.append(f'<p class="note">genunc {__version__}: genunc report '
                 f"{html.escape(str(export.directory))}</p>")
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>genunc report: {html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}"
            f"<script>{SCRIPT}</script></body></html>")
