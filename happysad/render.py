"""report.html: one self-contained page (inline CSS, images as data: URIs, no network, no script).

`render` is pure: it takes metrics, curve points, counts and rows that already
carry their thumbnails, and returns the HTML bytes; it never sees a model or
Ray, so it is tested on hand-made arrays (report.page_for and report.training_page
gather what a page needs). `scoring_page` is a scoring run's page, from what
score_report gathered in its one pass (its hooks are in its docstring).

Stable hooks for readers and tests: #metrics, #confusion-matrix, #roc-pr,
#history (training only), #counts, #skipped, #worst (each thumbnail an
img.thumb inside figure.worst-row), #info.
"""

from __future__ import annotations

import base64
import html
import io
import json

from happysad.model import CLASSES

METRIC_NAMES = (("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"), ("auc", "AUC"), ("loss", "Log loss"))

CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1d2330; background: #f4f5f8; margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 0 0 12px; }
.sub { color: #5b6475; margin: 0 0 22px; }
section { background: #fff; border-radius: 10px; padding: 18px 22px; margin: 0 0 18px; box-shadow: 0 1px 3px rgba(20,30,50,.08); }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 12px; }
.card { background: #f7f8fb; border-radius: 8px; padding: 10px 12px; }
.card .name { color: #5b6475; font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.card .value { font-size: 24px; font-weight: 600; }
.card.undefined .value { color: #9aa2b1; font-size: 18px; }
.card .why { color: #9aa2b1; font-size: 12px; }
.row { display: flex; gap: 18px; align-items: flex-start; }
.row > section { flex: 1; }
table { border-collapse: collapse; }
td, th { padding: 6px 12px; text-align: right; border-bottom: 1px solid #e6e8ee; }
th { color: #5b6475; font-weight: 600; }
td.left, th.left { text-align: left; }
#confusion-matrix td.hit { background: #dff3e4; font-weight: 600; }
#confusion-matrix td.miss { background: #fbe3e1; font-weight: 600; }
img.plot { width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: 14px; }
figure.worst-row { margin: 0; background: #f7f8fb; border-radius: 8px; overflow: hidden; }
figure.worst-row.wrong { outline: 2px solid #e4574a; }
img.thumb { width: 100%; display: block; image-rendering: auto; }
figcaption { padding: 6px 8px 8px; font-size: 12.5px; }
figcaption .path { color: #5b6475; word-break: break-all; font-size: 11px; }
.tag { display: inline-block; border-radius: 4px; padding: 0 5px; font-size: 11px; font-weight: 600; color: #fff; background: #e4574a; }
.tag.ok { background: #3b9d5d; }
.note { color: #5b6475; font-size: 13px; }
pre { background: #f7f8fb; padding: 10px; border-radius: 6px; font-size: 12px; white-space: pre-wrap; word-break: break-all; }
table.fields { width: 100%; }
table.fields table.fields th, table.fields table.fields td { padding: 2px 8px; font-size: 13px; }
table.fields td { word-break: break-all; }
"""


def render(
    title: str,
    metrics: dict,
    curves: dict,
    worst: list[dict],
    counts: dict,
    skipped: dict,
    info: dict,
    history: list[dict] | None = None,
    subtitle: str = "",
) -> bytes:
    """The page. `metrics`: metrics.binary_metrics' dict; `curves`: metrics.curves' points ({} if undefined);
    `worst`: rows {path, score, label, true_label, loss, wrong, png}; `counts`: {split: {class: n}};
    `skipped`: {reason: n}; `info`: config, versions, data URIs; `history`: training epochs, if any.
    """
    parts = [
        f"<header><h1>{_e(title)}</h1><p class='sub'>{_e(subtitle or _default_subtitle(metrics))}</p></header>",
        _metric_cards(metrics),
        _history_section(history) if history is not None else "",
        "<div class='row'>" + _confusion_section(metrics) + _counts_section(counts, skipped) + "</div>",
        _curves_section(curves, metrics),
        _worst_section(worst),
        _info_section(info),
    ]
    body = "\n".join(p for p in parts if p)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    ).encode()


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _default_subtitle(metrics: dict) -> str:
    return f"{metrics['n']} labelled images scored; a score at or above the threshold {metrics['threshold']:.3f} is sad"


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _metric_cards(metrics: dict) -> str:
    cards = []
    for key, name in METRIC_NAMES:
        value = metrics.get(key)
        if value is None:  # undefined: n/a and why, never a 0 that looks measured
            why = metrics.get("undefined", {}).get(key, "not measured")
            inner, kind = f"<div class='value'>n/a</div><div class='why'>{_e(why)}</div>", "card undefined"
        else:
            inner, kind = f"<div class='value'>{value:.4f}</div>", "card"
        cards.append(f"<div class='{kind}' data-metric='{key}'><div class='name'>{name}</div>{inner}</div>")
    return f"<section id='metrics'><h2>Metrics at threshold {metrics['threshold']:.3f} (n = {metrics['n']})</h2><div class='cards'>{''.join(cards)}</div></section>"


def _confusion_section(metrics: dict) -> str:
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]["matrix"]
    cells = {("happy", "happy"): tn, ("happy", "sad"): fp, ("sad", "happy"): fn, ("sad", "sad"): tp}
    head = "<tr><th class='left'>true \\ predicted</th>" + "".join(f"<th>{c}</th>" for c in CLASSES) + "</tr>"
    rows = "".join(
        f"<tr><th class='left'>{t}</th>"
        + "".join(f"<td class='{'hit' if t == p else 'miss'}' data-true='{t}' data-predicted='{p}'>{cells[(t, p)]}</td>" for p in CLASSES)
        + "</tr>"
        for t in CLASSES
    )
    return f"<section><h2>Confusion matrix</h2><table id='confusion-matrix'>{head}{rows}</table><p class='note'>sad is the positive class</p></section>"


def _counts_section(counts: dict, skipped: dict) -> str:
    head = "<tr><th class='left'>split</th>" + "".join(f"<th>{c}</th>" for c in CLASSES) + "<th>total</th></tr>"
    rows = "".join(
        f"<tr><th class='left'>{_e(split)}</th>" + "".join(f"<td>{per.get(c, 0)}</td>" for c in CLASSES) + f"<td>{sum(per.values())}</td></tr>"
        for split, per in counts.items()
    )
    skipped_rows = "".join(f"<tr><td class='left'>{_e(r)}</td><td>{n}</td></tr>" for r, n in sorted(skipped.items()))
    skipped_table = (
        f"<table id='skipped'><tr><th class='left'>skipped, by reason</th><th>files</th></tr>{skipped_rows}</table>"
        if skipped_rows else "<p id='skipped' class='note'>No file skipped.</p>"
    )
    return f"<section><h2>Images per split and class</h2><table id='counts'>{head}{rows}</table><br>{skipped_table}</section>"


def _curves_section(curves: dict, metrics: dict) -> str:
    if not curves:
        why = metrics.get("undefined", {}).get("auc", "no scores")
        return f"<section id='roc-pr'><h2>ROC and precision-recall</h2><p class='note'>Not drawn: {_e(why)}.</p></section>"
    png = _roc_pr_png(curves, metrics)
    return f"<section id='roc-pr'><h2>ROC and precision-recall</h2><img class='plot' alt='ROC and precision-recall curves' src='{_png_uri(png)}'></section>"


def _history_section(history: list[dict]) -> str:
    png = _history_png(history)
    return f"<section id='history'><h2>Training: loss and accuracy per epoch</h2><img class='plot' alt='loss and accuracy curves' src='{_png_uri(png)}'></section>"


def _worst_section(worst: list[dict]) -> str:
    wrong = sum(r["wrong"] for r in worst)
    if worst and wrong == len(worst):
        heading = f"The {len(worst)} worst errors (highest loss)"
        note = ""
    else:
        errors = "No error" if wrong == 0 else "The only error" if wrong == 1 else f"All {wrong} errors"
        heading = f"{errors}, then the highest-loss correct calls ({len(worst)} images)"
        note = "<p class='note'>Fewer errors than thumbnails: after the errors come the correct calls with the highest loss, marked <span class='tag ok'>correct</span>.</p>"
    figures = "".join(_figure(row) for row in worst) or "<p class='note'>No labelled image was scored.</p>"
    legend = "<p class='note'>Each: the face, and beside it the Grad-CAM heat map for the label the model gave (red = most evidence).</p>"
    return f"<section id='worst'><h2>{heading}</h2>{legend}{note}<div class='grid'>{figures}</div></section>"


def _figure(row: dict) -> str:
    name = row["path"].rsplit("/", 1)[-1]
    tag = "<span class='tag'>error</span>" if row["wrong"] else "<span class='tag ok'>correct</span>"
    return (
        f"<figure class='worst-row{' wrong' if row['wrong'] else ''}'><img class='thumb' alt='{_e(name)}' src='{_png_uri(row['png'])}'>"
        f"<figcaption>{tag} true <b>{_e(row['true_label'])}</b>, called <b>{_e(row['label'])}</b><br>"
        f"P(sad) {row['score']:.3f} · loss {row['loss']:.2f}<div class='path' title='{_e(row['path'])}'>{_e(name)}</div></figcaption></figure>"
    )


def _info_section(info: dict, title: str = "Config, versions and data") -> str:
    return f"<section id='info'><h2>{_e(title)}</h2>{_fields(info)}</section>"


def _fields(value, depth: int = 0) -> str:
    """A value as a person reads it: a dict as a table of its keys (nested dicts as tables in their cells, a
    few levels deep), a list as its items one per line, a float to 4 significant digits, None as n/a."""
    if isinstance(value, dict) and value and depth < 3:
        rows = "".join(f"<tr><th class='left'>{_e(k)}</th><td class='left'>{_fields(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f"<table class='fields'>{rows}</table>"
    if isinstance(value, (list, tuple)) and depth < 3:
        return "<br>".join(_fields(v, depth + 1) for v in value) or "<span class='note'>none</span>"
    if isinstance(value, float):
        return _e(f"{value:.4g}")
    if value is None:
        return "<span class='note'>n/a</span>"
    return _e(value if isinstance(value, str) else json.dumps(value))


# --- plots (matplotlib, PNG bytes) -------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _roc_pr_png(curves: dict, metrics: dict) -> bytes:
    plt = _pyplot()
    at, threshold = curves["at"], metrics["threshold"]
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.2))
    auc = metrics.get("auc")
    roc.plot(curves["fpr"], curves["tpr"], color="#3566c8", lw=2, label=f"ROC (AUC {auc:.3f})" if auc is not None else "ROC")
    roc.plot([0, 1], [0, 1], ls="--", color="#b5bac4", lw=1, label="chance")
    roc.plot(at["fpr"], at["tpr"], "o", color="#e4574a", ms=9, label=f"threshold {threshold:.3f}")
    roc.set(xlabel="false positive rate (happy called sad)", ylabel="true positive rate (sad found)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="ROC")
    pr.step(curves["recall"], curves["precision"], where="post", color="#3566c8", lw=2, label="precision-recall")
    pr.axhline(curves["base_rate"], ls="--", color="#b5bac4", lw=1, label=f"share of sad {curves['base_rate']:.2f}")
    if at["precision"] is not None:
        pr.plot(at["tpr"], at["precision"], "o", color="#e4574a", ms=9, label=f"threshold {threshold:.3f}")
    pr.set(xlabel="recall (sad found)", ylabel="precision (sad calls right)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title="Precision-recall")
    for ax in (roc, pr):
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _history_png(history: list[dict]) -> bytes:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for column, label, colour in ((key, "train", "#3566c8"), (f"val_{key}", "val", "#e08a2c")):
            points = [(row["epoch"], row[column]) for row in history if row.get(column) is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=colour, label=label)
        ax.set(xlabel="epoch", title=key)
        integer_epochs(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    return _png(fig)


def integer_epochs(ax) -> None:
    """Ticks at whole epochs only: an epoch 1.25 means nothing."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# --- a scoring run's page (score_report gathers what it shows) -------------------------------------------------------

SCORING_CSS = """
.cards.five { grid-template-columns: repeat(5, 1fr); }
.cards.two { grid-template-columns: repeat(2, 1fr); }
.card.stable .value { color: #2f7d4a; } .card.moderate .value { color: #b7791f; } .card.shifted .value { color: #c2402f; }
.card .level { font-size: 12px; color: #5b6475; }
svg.histogram { width: 100%; height: auto; display: block; }
.sheet { display: grid; grid-template-columns: repeat(8, 1fr); gap: 8px; }
figure.sheet-item { margin: 0; background: #f7f8fb; border-radius: 8px; overflow: hidden; }
figure.sheet-item .missing { aspect-ratio: 1; display: flex; align-items: center; justify-content: center; padding: 8px;
  color: #9aa2b1; font-size: 11px; text-align: center; background: #eceef3; }
td.examples { text-align: left; font-size: 11.5px; color: #5b6475; word-break: break-all; }
td.examples code { display: block; }
.reading { margin: 10px 0 0; }
"""

SHEET_TITLES = {
    "sad": ("The most confident sad calls", "the highest scores called sad"),
    "happy": ("The most confident happy calls", "the lowest scores called happy"),
    "borderline": ("Borderline: the scores nearest the threshold", "what the model is least sure of, either side"),
}


def scoring_page(summary: dict, sheets: dict[str, list[dict]], reference: list[int] | None) -> bytes:
    """A scoring run's page (_report.html). `summary`: _summary.json's dict (score_report.build); `sheets`: {sad, happy,
    borderline: rows {path, score, and jpeg (bytes) or unreadable (why)}}; `reference`: the validation
    histogram (metrics.DRIFT_BINS counts) or None.

    Stable hooks: #counts (each card data-count=NAME), #errors (a row per reason, data-reason), #histogram
    (svg.histogram), #drift (data-psi, data-ks, or p.note when not measured), #sheet-sad, #sheet-happy,
    #sheet-borderline (each thumbnail an img.thumb inside figure.sheet-item, data-score), #info.
    """
    model = summary["model"]
    subtitle = (
        f"{summary['rows']} rows in {summary['output']}, scored by model {model['id'] or 'unknown'} at threshold "
        f"{model['threshold']:.3f}: a score (P(sad)) at or above it is sad."
    )
    parts = [
        f"<header><h1>Scoring run report</h1><p class='sub'>{_e(subtitle)}</p></header>",
        _scoring_counts(summary),
        _histogram_section(summary, reference),
        _drift_section(summary["drift"]),
        *(_sheet_section(name, rows) for name, rows in sheets.items()),
        _info_section({"output": summary["output"], "model": model, "summary": "_summary.json beside this page: the same figures"}, "The output and its model"),
    ]
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Scoring run report</title><style>{CSS}{SCORING_CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n"
    ).encode()


def _scoring_counts(summary: dict) -> str:
    errors = summary["errors"]
    cards = [("rows", "Rows", summary["rows"]), ("happy", "Happy", summary["labels"]["happy"]),
             ("sad", "Sad", summary["labels"]["sad"]), ("errors", "Errors", sum(errors.values())),
             ("scored", "Scored", summary["scored"])]
    html_cards = "".join(
        f"<div class='card' data-count='{key}'><div class='name'>{name}</div><div class='value'>{value:,}</div></div>"
        for key, name, value in cards
    )
    if errors:
        rows = "".join(
            f"<tr data-reason='{_e(reason)}'><td class='left'>{_e(reason)}</td><td>{n:,}</td><td class='examples'>"
            + "".join(f"<code>{_e(p)}</code>" for p in summary["error_examples"].get(reason, []))
            + "</td></tr>"
            for reason, n in errors.items()
        )
        table = (
            "<table id='errors'><tr><th class='left'>error</th><th>rows</th><th class='left'>examples (the first "
            f"paths, sorted)</th></tr>{rows}</table>"
        )
    else:
        table = "<p id='errors' class='note'>No row has an error.</p>"
    return f"<section id='counts'><h2>Counts</h2><div class='cards five'>{html_cards}</div><br>{table}</section>"


def _histogram_section(summary: dict, reference: list[int] | None) -> str:
    svg = _histogram_svg(summary["histogram"]["counts"], reference, summary["model"]["threshold"])
    note = "Each bar: the share of this run's scored images in a 0.01-wide band of scores."
    if reference is not None:
        note += " The line: the validation split's share, spread evenly over each of its 0.05-wide bins."
    return f"<section id='histogram'><h2>Scores</h2>{svg}<p class='note'>{note}</p></section>"


def _histogram_svg(counts: list[int], reference: list[int] | None, threshold: float) -> str:
    """Inline SVG: this run's shares per bin as bars (happy side green, sad side blue), the validation
    shares as a step line, the threshold as a dashed line."""
    width, height, left, right, top, bottom = 1000, 280, 56, 16, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    n = sum(counts)
    shares = [c / n if n else 0.0 for c in counts]
    fine = len(counts)
    ref_shares = []
    if reference is not None and sum(reference):
        per = fine // len(reference)
        ref_shares = [c / sum(reference) / per for c in reference for _ in range(per)]
    top_share = max([*shares, *ref_shares, 1e-9]) * 1.08

    def x(value: float) -> float:
        return left + value * plot_w

    def y(share: float) -> float:
        return top + plot_h * (1 - share / top_share)

    out = [f"<svg class='histogram' viewBox='0 0 {width} {height}' role='img' aria-label='score histogram'>"]
    for k in range(5):  # grid and share labels
        share = top_share * k / 4
        out.append(f"<line x1='{left}' x2='{width - right}' y1='{y(share):.1f}' y2='{y(share):.1f}' stroke='#e6e8ee'/>")
        out.append(f"<text x='{left - 6}' y='{y(share) + 4:.1f}' font-size='11' text-anchor='end' fill='#5b6475'>{share:.1%}</text>")
    for i, share in enumerate(shares):
        if share:
            colour = "#3566c8" if (i + 0.5) / fine >= threshold else "#3b9d5d"
            out.append(  # the <title> is the browser's tooltip: the bar's band and count, no script
                f"<rect x='{x(i / fine) + 0.5:.1f}' y='{y(share):.1f}' width='{plot_w / fine - 1:.1f}' "
                f"height='{top + plot_h - y(share):.1f}' fill='{colour}'><title>{i / fine:.2f} to {(i + 1) / fine:.2f}: "
                f"{counts[i]:,} images ({share:.1%})</title></rect>"
            )
    if ref_shares:
        points = " ".join(f"{x(i / fine):.1f},{y(s):.1f} {x((i + 1) / fine):.1f},{y(s):.1f}" for i, s in enumerate(ref_shares))
        out.append(f"<polyline points='{points}' fill='none' stroke='#e08a2c' stroke-width='2'/>")
    out.append(f"<line x1='{x(threshold):.1f}' x2='{x(threshold):.1f}' y1='{top - 8}' y2='{top + plot_h}' stroke='#1d2330' stroke-width='1.5' stroke-dasharray='5,4'/>")
    anchor = "end" if threshold > 0.85 else "start"
    shift = -5 if anchor == "end" else 5
    out.append(f"<text x='{x(threshold) + shift:.1f}' y='{top - 12}' font-size='12' text-anchor='{anchor}' fill='#1d2330'>threshold {threshold:.3f}</text>")
    for tick in (0, 0.25, 0.5, 0.75, 1):
        out.append(f"<text x='{x(tick):.1f}' y='{top + plot_h + 16}' font-size='11' text-anchor='middle' fill='#5b6475'>{tick:g}</text>")
    out.append(f"<text x='{left + plot_w / 2:.1f}' y='{height - 6}' font-size='12' text-anchor='middle' fill='#5b6475'>score: P(sad)</text>")
    legend = [("#3b9d5d", "rect", "called happy"), ("#3566c8", "rect", "called sad")]
    if ref_shares:
        legend.append(("#e08a2c", "line", f"validation ({sum(reference):,} images)"))
    lx = left + 8
    for colour, shape, label in legend:
        mark = (f"<rect x='{lx}' y='{top + 2}' width='12' height='10' fill='{colour}'/>" if shape == "rect"
                else f"<line x1='{lx}' x2='{lx + 12}' y1='{top + 7}' y2='{top + 7}' stroke='{colour}' stroke-width='2'/>")
        out.append(mark + f"<text x='{lx + 16}' y='{top + 11}' font-size='11.5' fill='#1d2330'>{_e(label)}</text>")
        lx += 30 + 7 * len(label)
    out.append("</svg>")
    return "".join(out)


def _drift_section(drift: dict) -> str:
    head = "<h2>Drift against validation</h2>"
    if drift.get("psi") is None:
        return f"<section id='drift'>{head}<p class='note'>Not measured: {_e(drift.get('reason', 'no reference'))}.</p></section>"
    cards = (
        f"<div class='card {drift['psi_level']}'><div class='name'>PSI</div><div class='value'>{drift['psi']:.3f}</div>"
        f"<div class='level'>{_e(drift['psi_level'])}; by chance alone about {drift['psi_by_chance']:.3f}</div></div>"
        f"<div class='card'><div class='name'>KS</div><div class='value'>{drift['ks']:.3f}</div>"
        f"<div class='level'>p = {drift['ks_p_value']:.2g}; 5 % critical value {drift['ks_critical_05']:.3f}</div></div>"
    )
    readings = "".join(f"<p class='reading'>{_e(text)}</p>" for text in drift["reading"].values())
    rule = (
        f"<p class='note'>This run's {drift['n']:,} scores against the {drift['reference_n']:,} validation scores kept in the "
        f"model's model.json, both in {drift['bins']} equal bins on [0, 1]. PSI: {_e(drift['psi_rule'])}, the credit-scoring "
        "rule of thumb (N. Siddiqi, <i>Credit Risk Scorecards</i>, Wiley 2006). KS: the largest gap between the two "
        "cumulative distributions at a bin edge (the exact statistic is at least this).</p>"
    )
    return (
        f"<section id='drift' data-psi='{drift['psi']:.6f}' data-ks='{drift['ks']:.6f}'>{head}"
        f"<div class='cards two'>{cards}</div>{readings}{rule}</section>"
    )


def _sheet_section(name: str, rows: list[dict]) -> str:
    title, what = SHEET_TITLES[name]
    figures = "".join(_sheet_item(row) for row in rows) or "<p class='note'>No scored image.</p>"
    note = f"<p class='note'>{len(rows)} images: {what}, from the whole run.</p>"
    return f"<section id='sheet-{name}'><h2>{title}</h2>{note}<div class='sheet'>{figures}</div></section>"


def _sheet_item(row: dict) -> str:
    path = row["path"]
    shown = path.rsplit("/", 1)[-1] if "#" not in path else path.split("#", 1)[0].rsplit("/", 1)[-1] + "#" + path.split("#", 1)[1]
    if "jpeg" in row:
        picture = f"<img class='thumb' alt='{_e(shown)}' src='data:image/jpeg;base64,{base64.b64encode(row['jpeg']).decode()}'>"
    else:
        picture = f"<div class='missing'>not shown: {_e(row.get('unreadable') or 'unreadable')}</div>"
    return (
        f"<figure class='sheet-item' data-score='{row['score']:.6f}'>{picture}<figcaption>P(sad) <b>{row['score']:.4f}</b>"
        f"<div class='path' title='{_e(path)}'>{_e(shown)}</div></figcaption></figure>"
    )
