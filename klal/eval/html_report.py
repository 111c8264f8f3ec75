"""``report.html``: one self-contained page per evaluation, to browse every sample in a browser (no server, no network).

The page holds the methods x metrics table (the values of ``results.json``: benchmark metrics, then each task's
grounding metrics) and one card per sample: the image with the selected method's relevance map (heat) and its boxes or
crop (red, dashed) drawn on it, the evidence (green), the question, the gold answer, and every method's answer with its
score and whether it is right. Controls: which method is drawn and filtered on, right / wrong / unscored, only the
samples where the methods disagree, and sorting by the selected method's score, pointing or evidence mass. The state
lives in the URL's ``#`` part (``#method=NAME&filter=wrong&disagree=1&sort=score-desc``), so a view can be shared.

Fast with thousands of cards: images are small JPEG thumbnails embedded once as data URIs in a JSON block, and a card
is drawn (image decoded, map painted on a canvas) only when it scrolls into view (``IntersectionObserver``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from klal.data.io import read_row
from klal.eval.benchmarks import BASELINE_ROWS, benchmark_columns
from klal.eval.report import SHORT

THUMB = 256
"""Longest side of the embedded images, in pixels."""

GROUNDING_COLUMNS = ("pointing_game", "evidence_mass", "box_accuracy", "answer_accuracy")
"""The grounding metrics shown in the table (per task, where any method has a count)."""


def table_cells(results: Mapping[str, Any]) -> tuple[list[str], list[dict[str, str]], list[str]]:
    """``(columns, column keys, row labels)`` and, through :func:`cell_value`, the values: the page's table.

    Column keys are ``bench|GROUP|METRIC`` (``results["benchmark_metrics"]``) or ``metric|TASK|METRIC``
    (``results["metrics"]``).
    """
    methods = [m["row"] for m in results["methods"]]
    bench = results.get("benchmark_metrics") or {}
    named = benchmark_columns(bench, results.get("benchmarks", {}))
    cols: list[dict[str, str]] = [{"key": f"bench|{g}|{m}", "label": f"{g}: {m}"} for g, m in named]
    metrics = results.get("metrics") or {}
    tasks = sorted({t for r in methods for t in metrics.get(r, {})})
    for t in tasks:
        for name in GROUNDING_COLUMNS:
            if any(metrics.get(r, {}).get(t, {}).get(name, {}).get("count", 0) for r in methods):
                cols.append({"key": f"metric|{t}|{name}", "label": f"{t}: {SHORT[name]}"})
    rows = methods + [b for b in BASELINE_ROWS if b in bench]
    return [c["label"] for c in cols], cols, rows


def cell_value(results: Mapping[str, Any], key: str, row: str) -> dict[str, Any] | None:
    """The ``{"value", "count"}`` behind a table cell, or None (an empty cell)."""
    kind, group, metric = key.split("|")
    source = results.get("benchmark_metrics" if kind == "bench" else "metrics") or {}
    cell = source.get(row, {}).get(group, {}).get(metric)
    return cell if cell and cell.get("count", 0) > 0 else None


def _thumb(image: Any) -> tuple[str, float]:
    """A JPEG data URI of the image at most :data:`THUMB` px on its longest side, and the scale applied."""
    scale = min(1.0, THUMB / max(image.width, image.height))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size) if scale < 1 else image
    buf = io.BytesIO()
    small.convert("RGB").save(buf, format="JPEG", quality=75)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), scale


def _map_payload(res: Any) -> dict[str, Any] | None:
    """Map 0 as ``{"h", "w", "v"}``, ``v`` the row-major values scaled to 0-255 (of its max) as base64 bytes (a third
    of the size of a JSON list), or None."""
    if res is None or not getattr(res, "maps", None):
        return None
    m = np.asarray(res.maps[0], dtype=np.float64)
    top = float(m.max()) if m.size else 0.0
    v = np.zeros_like(m) if not top > 0 else np.clip(m / top * 255.0, 0, 255)
    data = np.rint(v).astype(np.uint8).ravel().tobytes()
    return {"h": int(m.shape[0]), "w": int(m.shape[1]), "v": base64.b64encode(data).decode("ascii")}


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def sample_payload(results: Mapping[str, Any], runs: Mapping[str, Any], datasets: Mapping[str, Any]) -> list[dict]:
    """One dict per sample (in evaluation order) with its thumbnail, text, evidence and every method's answer."""
    methods = [m["row"] for m in results["methods"]]
    if not methods:
        return []
    out = []
    index = 0
    for name, rows in datasets.items():
        for i in range(len(rows)):
            row = read_row(rows, i, name)
            uri, scale = _thumb(row["image"][0] if isinstance(row["image"], list) else row["image"])
            ev = row.get("evidence") or {}
            per = {}
            for m in methods:
                rec = runs[m].samples[index]
                res = runs[m].results[index] if index < len(runs[m].results) else None
                b = rec.get("bench") or {}
                per[m] = {
                    "answer": rec.get("answer"),
                    "score": _num(b.get("score")),
                    "correct": b.get("correct"),
                    "pointing": _num(b.get("pointing")),
                    "mass": _num(b.get("mass")),
                    "boxes": [[v * scale for v in box] for box in rec.get("boxes", [])[:2]],
                    "map": _map_payload(res),
                }
            out.append(
                {
                    "id": str(row["id"]),
                    "dataset": name,
                    "task": row["task"],
                    "question": row["question"],
                    "gold": row["answer"],
                    "img": uri,
                    "boxes": [[v * scale for v in box] for box in ev.get("boxes") or []],
                    "points": [[v * scale for v in p] for p in ev.get("points") or []],
                    "per": per,
                }
            )
            index += 1
    return out


def render_html(results: Mapping[str, Any], samples: Sequence[dict[str, Any]]) -> str:
    """The page (module docstring) for ``results`` and the :func:`sample_payload` of its samples."""
    labels, cols, rows = table_cells(results)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["method", *labels])
    body = []
    for r in rows:
        cells = [f'<th class="row">{html.escape(r)}</th>']
        for c in cols:
            v = cell_value(results, c["key"], r)
            if v is None:
                cells.append(f'<td data-key="{html.escape(c["key"])}">-</td>')
            else:
                cells.append(
                    f'<td data-key="{html.escape(c["key"])}" data-value="{float(v["value"])!r}" '
                    f'data-count="{int(v["count"])}">{float(v["value"]):.3f} <small>({int(v["count"])})</small></td>'
                )
        body.append(f'<tr data-row="{html.escape(r)}">' + "".join(cells) + "</tr>")
    data = json.dumps({"methods": [m["row"] for m in results["methods"]], "samples": list(samples)})
    data = data.replace("</", "<\\/")  # a question containing "</script>" must not end the block
    title = f"klal evaluation: {results.get('model', '')}"
    return (
        _TEMPLATE.replace("__TITLE__", html.escape(title))
        .replace("__HEAD__", head)
        .replace("__BODY__", "\n".join(body))
        .replace("__DATA__", data)
    )


def write_html_report(
    path: str | Path, results: Mapping[str, Any], runs: Mapping[str, Any], datasets: Mapping[str, Any]
) -> None:
    """Write ``report.html`` for an evaluation (``runs`` must have kept their results for the maps)."""
    Path(path).write_text(render_html(results, sample_payload(results, runs, datasets)), encoding="utf-8")


_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;margin-bottom:12px}th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th.row{text-align:left}small{color:#777}
#controls{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #ddd;z-index:2}
#controls label{margin-right:14px}
#cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.card{width:276px;border:1px solid #ccc;border-radius:6px;padding:8px;box-sizing:border-box;min-height:420px}
.card canvas{width:256px;display:block;background:#eee}
.card .q{font-weight:600;margin:6px 0;white-space:pre-wrap}
.card ul{list-style:none;padding:0;margin:4px 0}.card li{padding:1px 0}
.ok{color:#0a7d22}.bad{color:#c0182b}.na{color:#888}.sel{background:#fff4c2}
</style></head><body>
<h1>__TITLE__</h1>
<table id="metrics"><thead><tr>__HEAD__</tr></thead><tbody>
__BODY__
</tbody></table>
<div id="controls">
<label>method <select id="method"></select></label>
<label>show <select id="filter"><option value="all">all</option><option value="right">right</option>
<option value="wrong">wrong</option><option value="unscored">unscored</option></select></label>
<label><input type="checkbox" id="disagree"> methods disagree</label>
<label>sort <select id="sort"><option value="order">evaluation order</option>
<option value="score-desc">score, high first</option><option value="score-asc">score, low first</option>
<option value="pointing-desc">pointing, high first</option><option value="pointing-asc">pointing, low first</option>
<option value="mass-desc">evidence mass, high first</option><option value="mass-asc">evidence mass, low first</option>
</select></label>
<span id="shown"></span>
</div>
<div id="cards"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const S = D.samples, M = D.methods;
const $ = (id) => document.getElementById(id);
const state = {method: M[0] || "", filter: "all", disagree: false, sort: "order"};
function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  if (p.has("method") && M.includes(p.get("method"))) state.method = p.get("method");
  if (p.has("filter")) state.filter = p.get("filter");
  state.disagree = p.get("disagree") === "1";
  if (p.has("sort")) state.sort = p.get("sort");
}
function writeHash() {
  const p = new URLSearchParams({method: state.method, filter: state.filter, disagree: state.disagree ? "1" : "0",
                                 sort: state.sort});
  history.replaceState(null, "", "#" + p.toString());
}
function esc(t) {
  const d = document.createElement("div"); d.textContent = t == null ? "" : String(t); return d.innerHTML;
}
function verdict(c) { return c === true ? ["ok", "right"] : c === false ? ["bad", "wrong"] : ["na", "unscored"]; }
function disagrees(s) {
  const v = M.map((m) => s.per[m].correct).filter((c) => c === true || c === false);
  return v.length > 1 && v.some((c) => c !== v[0]);
}
const cards = S.map((s, i) => {
  const el = document.createElement("div");
  el.className = "card"; el.dataset.index = i; el.dataset.id = s.id;
  const lis = M.map((m) => {
    const p = s.per[m], [cls, word] = verdict(p.correct);
    const sc = p.score == null ? "" : ` <small>score ${p.score.toFixed(3)}</small>`;
    const said = esc(p.answer == null ? "-" : p.answer);
    return `<li data-method="${esc(m)}"><b>${esc(m)}</b>: <span class="${cls}">${said}` +
           ` (${word})</span>${sc}</li>`;
  }).join("");
  el.innerHTML = `<canvas></canvas><div><small>${esc(s.dataset)} · ${esc(s.task)} · ${esc(s.id)}</small></div>` +
    `<div class="q">${esc(s.question)}</div><div>gold: <b>${esc(s.gold)}</b></div><ul>${lis}</ul>`;
  return el;
});
function draw(el) {
  const s = S[+el.dataset.index], p = s.per[state.method], cv = el.querySelector("canvas");
  const img = new Image();
  img.onload = () => {
    cv.width = img.width; cv.height = img.height;
    const g = cv.getContext("2d");
    g.drawImage(img, 0, 0);
    if (p && p.map) {
      const mx = p.map, cw = img.width / mx.w, ch = img.height / mx.h, raw = atob(mx.v);
      for (let r = 0; r < mx.h; r++) for (let c = 0; c < mx.w; c++) {
        const v = raw.charCodeAt(r * mx.w + c) / 255;
        g.fillStyle = `rgba(255,${Math.round(200 * (1 - v))},0,${0.55 * v})`;
        g.fillRect(c * cw, r * ch, cw + 0.5, ch + 0.5);
      }
    }
    g.lineWidth = 2; g.strokeStyle = "#00d000"; g.setLineDash([]);
    for (const b of s.boxes) g.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
    for (const q of s.points) { g.beginPath(); g.arc(q[0], q[1], 4, 0, 7); g.stroke(); }
    g.strokeStyle = "#ff1a1a"; g.setLineDash([5, 3]);
    for (const b of (p ? p.boxes : [])) g.strokeRect(b[0], b[1], b[2] - b[0], b[3] - b[1]);
  };
  img.src = s.img;
  el.dataset.drawn = state.method;
  for (const li of el.querySelectorAll("li")) li.classList.toggle("sel", li.dataset.method === state.method);
}
const seen = new IntersectionObserver((entries) => {
  for (const e of entries) if (e.isIntersecting && e.target.dataset.drawn !== state.method) draw(e.target);
}, {rootMargin: "400px"});
function key(s) {
  const [what] = state.sort.split("-"), v = s.per[state.method][what];
  return v == null ? -Infinity : v;
}
function apply() {
  const keep = [];
  S.forEach((s, i) => {
    const c = s.per[state.method].correct;
    let ok = state.filter === "all" || (state.filter === "right" && c === true) ||
             (state.filter === "wrong" && c === false) || (state.filter === "unscored" && c !== true && c !== false);
    if (state.disagree && !disagrees(s)) ok = false;
    cards[i].style.display = ok ? "" : "none";
    if (ok) keep.push(i);
  });
  if (state.sort !== "order") {
    const sign = state.sort.endsWith("desc") ? -1 : 1;
    keep.sort((a, b) => sign * (key(S[a]) - key(S[b])) || a - b);
  }
  const box = $("cards");
  for (const i of keep) box.appendChild(cards[i]);
  for (const el of cards) { el.dataset.drawn = el.dataset.drawn === state.method ? state.method : ""; }
  for (const el of cards) { seen.unobserve(el); if (el.style.display !== "none") seen.observe(el); }
  $("shown").textContent = `${keep.length} of ${S.length} samples shown`;
  $("shown").dataset.count = keep.length;
  writeHash();
}
for (const m of M) {
  const o = document.createElement("option"); o.value = o.textContent = m; $("method").appendChild(o);
}
readHash();
$("method").value = state.method; $("filter").value = state.filter; $("disagree").checked = state.disagree;
$("sort").value = state.sort;
$("method").onchange = (e) => { state.method = e.target.value; apply(); };
$("filter").onchange = (e) => { state.filter = e.target.value; apply(); };
$("disagree").onchange = (e) => { state.disagree = e.target.checked; apply(); };
$("sort").onchange = (e) => { state.sort = e.target.value; apply(); };
const frag = document.createDocumentFragment();
for (const el of cards) frag.appendChild(el);
$("cards").appendChild(frag);
apply();
document.body.dataset.readyMs = Math.round(performance.now());  // page ready (for the report's speed check)
</script></body></html>
"""

__all__ = ["THUMB", "cell_value", "render_html", "sample_payload", "table_cells", "write_html_report"]
