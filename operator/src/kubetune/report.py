"""The end-of-run evaluation report (base vs tuned), as a static HTML page and as a terminal table.

Pure functions of the trainer's ``evaluation/summary.json`` (a dict) and ``evaluation/answers.jsonl`` (rows,
parsed by ``load_rows``): no I/O, no torch, stdlib only. The trainer renders ``report.html`` with
``render_html``; ``kubetune report`` renders the same page locally and prints ``render_table``.

Everything in the data is untrusted text (prompts are user data, answers are model output): the page
escapes all of it and forbids scripts and remote loads in its Content-Security-Policy besides; the table
makes control characters visible so an answer cannot drive the terminal.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from html import escape
from typing import Any

# Headline metrics in display order, with the direction that counts as an improvement.
METRICS: tuple[str, ...] = ("loss", "perplexity", "tokenAccuracy", "exactMatch", "rougeL")
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
HIGHER_IS_BETTER = frozenset({"tokenAccuracy", "exactMatch", "rougeL"})
LABELS = {
    "loss": "loss",
    "perplexity": "perplexity",
    "tokenAccuracy": "token accuracy",
    "exactMatch": "exact match",
    "rougeL": "ROUGE-L",
}
# Per-answer scores in answers.jsonl, as the table abbreviates them
SCORE_LABELS = {"exactMatch": "EM", "rougeL": "ROUGE-L"}
# A delta this small is "no change", not a win or a loss
EPSILON = 1e-9
# Terminal table: lines shown per answer before it is cut (the HTML page shows it all)
MAX_LINES = 6
MIN_WIDTH = 40


# --- answers.jsonl -----------------------------------------------------------------------------


def load_rows(text: str, name: str = "answers.jsonl") -> list[dict[str, Any]]:
    """The rows of answers.jsonl. A bad line raises ValueError naming ``name``, the line number and the
    rule it breaks; blank lines are skipped."""
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: not a JSON object")
        problem = _row_problem(row)
        if problem:
            raise ValueError(f"{where}: {problem}")
        rows.append(row)
    return rows


def _row_problem(row: dict[str, Any]) -> str | None:
    index = row.get("index")
    if "index" in row and (not isinstance(index, int) or isinstance(index, bool) or index < 0):
        return '"index" must be a non-negative integer'
    for key in ("prompt", "base", "tuned"):
        if not isinstance(row.get(key), str):
            return f'"{key}" must be a string' if key in row else f'"{key}" is missing'
    if row.get("reference") is not None and not isinstance(row["reference"], str):
        return '"reference" must be a string or null'
    scores = row.get("scores")
    if scores is None:
        return None
    if not isinstance(scores, dict):
        return '"scores" must be an object'
    for side, values in scores.items():
        if side not in ("base", "tuned"):
            return f'"scores" has an unknown key "{side[:40]}" (only "base" and "tuned")'
        if not isinstance(values, dict):
            return f'"scores.{side}" must be an object'
        for metric, value in values.items():
            if not _is_number(value):
                return f'"scores.{side}.{metric[:40]}" must be a number'
    return None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- shared: metrics, numbers, verdicts --------------------------------------------------------


def verdict(metric: str, delta: Any) -> str:
    """'better', 'worse' or 'same' for a change of ``metric`` by ``delta`` (tuned - base); '' when the
    metric's direction is unknown or the delta is not a finite number."""
    if not _is_number(delta) or not math.isfinite(delta):
        return ""
    if abs(delta) <= EPSILON:
        return "same"
    if metric in LOWER_IS_BETTER:
        return "better" if delta < 0 else "worse"
    if metric in HIGHER_IS_BETTER:
        return "better" if delta > 0 else "worse"
    return ""


def metric_rows(summary: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(metric, base, tuned, delta) for every metric any side has: the known ones first, in METRICS order,
    then the others by name. A missing delta is tuned - base when both are numbers."""
    sides: list[dict[str, Any]] = [_dict(summary.get(k)) for k in ("base", "tuned", "delta")]
    base, tuned, delta = sides
    names = [m for m in METRICS if any(m in s for s in sides)]
    names += sorted({str(m) for s in sides for m in s} - set(names))
    out = []
    for m in names:
        d = delta.get(m)
        if d is None and _is_number(base.get(m)) and _is_number(tuned.get(m)):
            d = tuned[m] - base[m]
        out.append((m, base.get(m), tuned.get(m), d))
    return out


def _fmt(metric: str, v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    if not _is_number(v):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    digits = 2 if metric == "perplexity" else 4
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _scores_text(scores: Any) -> str:
    """'EM 1 · ROUGE-L 0.8571' for one answer's scores."""
    if not isinstance(scores, dict) or not scores:
        return ""
    parts = []
    for k, v in scores.items():
        label = SCORE_LABELS.get(k, str(k))
        parts.append(f"{label} {v:g}" if k == "exactMatch" and _is_number(v) else f"{label} {_fmt(k, v)}")
    return " · ".join(parts)


def _row_scores(row: dict[str, Any], side: str) -> Any:
    scores = row.get("scores")
    return scores.get(side) if isinstance(scores, dict) else None


def _meta_line(summary: dict[str, Any]) -> str:
    """'split test · 200 examples · 20 prompts · maxNewTokens 128 · temperature 0.0'."""
    parts = []
    if summary.get("split") is not None:
        parts.append(f"split {summary['split']}")
    for key in ("examples", "prompts"):
        if summary.get(key) is not None:
            parts.append(f"{summary[key]} {key}")
    gen = summary.get("generation")
    if isinstance(gen, dict):
        parts += [f"{k} {v}" for k, v in gen.items()]
    return " · ".join(str(p) for p in parts)


# --- HTML --------------------------------------------------------------------------------------

# No scripts, no remote anything: the page is data to look at, and the data is untrusted.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #59636e; margin: 0; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d1d9e0; padding: 6px 10px; vertical-align: top; text-align: left; }
thead th { background: #f6f8fa; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
.dir { color: #59636e; font-weight: normal; font-size: 12px; }
.better { color: #1a7f37; background: #dafbe1; } .worse { color: #cf222e; background: #ffebe9; }
.same { color: #59636e; }
table.answers { width: 100%; table-layout: fixed; }
table.answers col.index { width: 3em; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, SFMono-Regular, monospace;
  font-size: 13px; }
.scores { margin-top: 6px; font-size: 12px; color: #59636e; font-family: system-ui, sans-serif; }
.none { color: #8c959f; font-style: italic; }
"""


def _e(v: Any) -> str:
    return escape(v if isinstance(v, str) else str(v), quote=True)


def _metrics_html(summary: dict[str, Any]) -> str:
    rows = metric_rows(summary)
    if not rows:
        return '<p class="none">No metrics in summary.json.</p>'
    body = []
    for m, b, t, d in rows:
        v = verdict(m, d)
        direction = "lower is better" if m in LOWER_IS_BETTER else "higher is better" if m in HIGHER_IS_BETTER else ""
        label = _e(LABELS.get(m, m)) + (f' <span class="dir">({direction})</span>' if direction else "")
        body.append(
            f'<tr data-metric="{_e(m)}"><th scope="row">{label}</th><td class="base">{_e(_fmt(m, b))}</td>'
            f'<td class="tuned">{_e(_fmt(m, t))}</td>'
            f'<td class="delta {v}" data-verdict="{v}">{_e(_fmt(m, d, signed=True))}</td></tr>'
        )
    return (
        '<table class="metrics"><thead><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr></thead>'
        "<tbody>\n" + "\n".join(body) + "\n</tbody></table>"
    )


def _answer_cell(cls: str, text: Any, scores: Any = None) -> str:
    if text is None:
        return f'<td class="{cls}"><span class="none">none</span></td>'
    s = _scores_text(scores)
    extra = f'<div class="scores">{_e(s)}</div>' if s else ""
    return f'<td class="{cls}"><div class="text">{_e(text)}</div>{extra}</td>'


def _answers_html(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="none">No prompts were answered.</p>'
    body = []
    for i, row in enumerate(rows):
        index = row.get("index", i)
        body.append(
            f'<tr class="answer" id="prompt-{_e(index)}"><td class="index">{_e(index)}</td>'
            + _answer_cell("prompt", row.get("prompt", ""))
            + _answer_cell("base", row.get("base", ""), _row_scores(row, "base"))
            + _answer_cell("tuned", row.get("tuned", ""), _row_scores(row, "tuned"))
            + _answer_cell("reference", row.get("reference"))
            + "</tr>"
        )
    return (
        '<table class="answers"><colgroup><col class="index"><col><col><col><col></colgroup>'
        "<thead><tr><th>#</th><th>prompt</th><th>base</th><th>tuned</th><th>reference</th></tr></thead>"
        "<tbody>\n" + "\n".join(body) + "\n</tbody></table>"
    )


def render_html(summary: dict[str, Any], rows: list[dict[str, Any]], title: str) -> str:
    """The report page: the job's name, the headline metrics (base, tuned, delta coloured by whether the
    change is an improvement) and every prompt's answers side by side. Self-contained: inline CSS, no
    scripts, no external URLs."""
    t, n = _e(title), len(rows)
    meta = _meta_line(summary)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>kubetune evaluation: {t}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<header><h1>Evaluation: {t}</h1>" + (f'<p class="meta">{_e(meta)}</p>' if meta else "") + "</header>\n"
        f'<section id="metrics"><h2>Base vs tuned</h2>\n{_metrics_html(summary)}\n</section>\n'
        f'<section id="answers"><h2>Answers ({n} prompt{"s" * (n != 1)})</h2>\n{_answers_html(rows)}\n</section>\n'
        "</body></html>\n"
    )


# --- terminal ----------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(s: str) -> str:
    """Control characters (an ANSI escape in an answer) as visible escapes; tabs as spaces."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], s.replace("\t", "    "))


def _wrap(label: str, text: str, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """``label`` then ``text`` wrapped to ``width`` (indented under it), newlines kept, cut after
    ``max_lines`` lines with a note of what was left out."""
    indent = "    "
    lines: list[str] = []
    for para in _visible(text).split("\n"):
        lines += textwrap.wrap(para, width - len(indent), break_long_words=True, replace_whitespace=False) or [""]
    if len(lines) > max_lines:
        more = len(lines) - (max_lines - 1)
        lines = lines[: max_lines - 1] + [f"... ({more} more lines: --html shows all)"]
    return [label[:width]] + [(indent + ln)[:width] for ln in lines]


def render_table(summary: dict[str, Any], rows: list[dict[str, Any]], width: int = 100) -> str:
    """The report as plain text no wider than ``width`` columns: the metrics table, then each prompt with
    its reference and both answers (long answers wrapped, then cut)."""
    width = max(MIN_WIDTH, width)
    out: list[str] = []
    meta = _visible(_meta_line(summary))
    if meta:
        out += textwrap.wrap(meta, width)
    table = [("metric", "base", "tuned", "delta", "")]
    for m, b, t, d in metric_rows(summary):
        table.append((LABELS.get(m, m), _fmt(m, b), _fmt(m, t), _fmt(m, d, signed=True), verdict(m, d)))
    if len(table) > 1:
        cols = [max(len(_visible(r[i])) for r in table) for i in range(4)]
        out.append("")
        for r in table:
            cells = [_visible(r[0]).ljust(cols[0])] + [_visible(r[i]).rjust(cols[i]) for i in (1, 2, 3)] + [r[4]]
            out.append("  ".join(cells).rstrip()[:width])
    else:
        out += ["", "no metrics in summary.json"]
    for i, row in enumerate(rows):
        index = row.get("index", i)
        out += ["", _visible(f"--- prompt {index} ").ljust(width, "-")[:width]]
        out += _wrap("prompt:", str(row.get("prompt", "")), width)
        if row.get("reference") is not None:
            out += _wrap("reference:", str(row["reference"]), width)
        for side in ("base", "tuned"):
            s = _scores_text(_row_scores(row, side))
            out += _wrap(f"{side}:" + (f" ({s})" if s else ""), str(row.get(side, "")), width)
    return "\n".join(out) + "\n"
