"""report.html: one self-contained page (inline CSS, images as data: URIs, no network, no script).

`render` is pure: it takes metrics, curve points, counts and rows that already
carry their thumbnails, and returns the HTML bytes; it never sees a model or
Ray, so it is tested on hand-made arrays (report.page_for and report.training_page
gather what a page needs).

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
    """The page. `metrics`: evaluate.binary_metrics' dict; `curves`: evaluate.curves' points ({} if undefined);
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


def _info_section(info: dict) -> str:
    rows = "".join(
        f"<tr><th class='left'>{_e(k)}</th><td class='left'><pre>{_e(json.dumps(v, indent=2) if not isinstance(v, str) else v)}</pre></td></tr>"
        for k, v in info.items()
    )
    return f"<section id='info'><h2>Config, versions and data</h2><table>{rows}</table></section>"


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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    fig.tight_layout()
    return _png(fig)
