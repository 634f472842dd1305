"""kubetune.report: the evaluation report page and terminal table, from summary.json and answers.jsonl."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from kubetune.report import load_rows, render_html, render_table, verdict

SCRIPT = "<script>alert(1)</script>"

SUMMARY = {
    "split": "test",
    "examples": 200,
    "prompts": 3,
    "generation": {"maxNewTokens": 128, "temperature": 0.0},
    "base": {"loss": 2.5, "perplexity": 12.18, "tokenAccuracy": 0.41, "exactMatch": 0.0, "rougeL": 0.31},
    "tuned": {"loss": 1.25, "perplexity": 3.49, "tokenAccuracy": 0.62, "exactMatch": 0.5, "rougeL": 0.2},
    "delta": {"loss": -1.25, "perplexity": -8.69, "tokenAccuracy": 0.21, "exactMatch": 0.5, "rougeL": -0.11},
}

ROWS = [
    {
        "index": 0,
        "prompt": "What is 2+2?\nAnswer with a number.",
        "reference": "4",
        "base": "The answer is four.\nI think.",
        "tuned": "4",
        "scores": {"base": {"exactMatch": 0, "rougeL": 0.0}, "tuned": {"exactMatch": 1, "rougeL": 1.0}},
    },
    {"index": 1, "prompt": f"Say {SCRIPT}", "reference": None, "base": SCRIPT, "tuned": "<b>bold</b> & 'q' \"dq\""},
    {"index": 2, "prompt": "Capital of France?", "reference": "Paris", "base": "Paris", "tuned": "Paris.",
     "scores": {"base": {"exactMatch": 1, "rougeL": 1.0}, "tuned": {"exactMatch": 0, "rougeL": 1.0}}},
]  # fmt: skip


class _Cells(HTMLParser):
    """Tags, and the text of each table row's cells (by class), as a browser would see them."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[dict[str, str]] = []  # answer rows: class -> text
        self.metrics: dict[str, dict[str, str]] = {}  # metric -> class -> text (and "verdict")
        self._row: dict[str, str] | None = None
        self._metric: str | None = None
        self._cell: str | None = None
        self._title = False
        self.title = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "tr" and "answer" in (a.get("class") or ""):
            self._row = {}
            self.rows.append(self._row)
        elif tag == "tr" and a.get("data-metric"):
            self._metric = a["data-metric"]
            self._row = self.metrics.setdefault(self._metric, {})
        elif tag in ("td", "th") and self._row is not None:
            self._cell = (a.get("class") or "").split(" ")[0] or tag
            self._row.setdefault(self._cell, "")
            if a.get("data-verdict") is not None:
                self._row["verdict"] = a["data-verdict"]
        elif tag == "title":
            self._title = True

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = self._metric = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "title":
            self._title = False

    def handle_data(self, data):
        if self._row is not None and self._cell:
            self._row[self._cell] += data
        if self._title:
            self.title += data


def parse(page: str) -> _Cells:
    p = _Cells()
    p.feed(page)
    p.close()
    return p


def test_everything_from_the_data_is_escaped():
    hostile = {**SUMMARY, "split": SCRIPT, "base": {**SUMMARY["base"], SCRIPT: 1.0}}
    page = render_html(hostile, ROWS, title=f"ns/{SCRIPT}")
    # one <script> would run: none appears as markup, each shows as text
    assert "<script" not in page.lower()
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # title, header, split, metric, prompt, answer
    assert "<b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; &#x27;q&#x27; &quot;dq&quot;" in page
    cells = parse(page)
    assert "script" not in cells.tags and "b" not in cells.tags
    assert cells.rows[1]["base"] == SCRIPT  # what a reader sees: the text itself
    assert cells.title == f"kubetune evaluation: ns/{SCRIPT}"


def test_page_is_self_contained_and_forbids_scripts():
    page = render_html(SUMMARY, ROWS, title="ns/job")
    assert not re.search(r"(src|href)\s*=|https?://|@import|url\(", page, re.I), "no external loads"
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert "white-space: pre-wrap" in page  # answers keep their newlines
    assert "The answer is four.\nI think." in page


def test_structure_one_row_per_prompt_and_the_metrics_table():
    cells = parse(render_html(SUMMARY, ROWS, title="team-a/sft-llama"))
    assert "Evaluation: team-a/sft-llama" in render_html(SUMMARY, ROWS, title="team-a/sft-llama")
    assert [r["index"] for r in cells.rows] == ["0", "1", "2"]
    assert cells.rows[0] == {
        "index": "0",
        "prompt": "What is 2+2?\nAnswer with a number.",
        "base": "The answer is four.\nI think.EM 0 · ROUGE-L 0.0000",
        "tuned": "4EM 1 · ROUGE-L 1.0000",
        "reference": "4",
    }
    assert cells.rows[1]["reference"] == "none"  # no reference: said so, and no scores
    assert "EM" not in cells.rows[1]["base"]
    assert list(cells.metrics) == ["loss", "perplexity", "tokenAccuracy", "exactMatch", "rougeL"]
    assert cells.metrics["loss"]["base"] == "2.5000" and cells.metrics["loss"]["tuned"] == "1.2500"
    assert cells.metrics["loss"]["delta"] == "-1.2500"
    assert cells.metrics["perplexity"]["delta"] == "-8.69"


def test_delta_colour_lower_is_better_for_loss_and_perplexity_higher_for_the_rest():
    cells = parse(render_html(SUMMARY, ROWS, title="j"))
    got = {m: c["verdict"] for m, c in cells.metrics.items()}
    assert got == {
        "loss": "better",
        "perplexity": "better",
        "tokenAccuracy": "better",
        "exactMatch": "better",
        "rougeL": "worse",
    }
    assert verdict("loss", 0.1) == verdict("perplexity", 2.0) == "worse"
    assert verdict("exactMatch", -0.5) == verdict("tokenAccuracy", -0.01) == "worse"
    assert verdict("rougeL", 0.0) == "same"
    assert verdict("somethingNew", 1.0) == verdict("loss", float("nan")) == verdict("loss", None) == ""
    page = render_html(SUMMARY, ROWS, title="j")
    assert re.search(r'<td class="delta better"[^>]*>-1\.2500</td>', page)
    assert re.search(r'<td class="delta worse"[^>]*>-0\.1100</td>', page)
    assert ".better {" in page and ".worse {" in page  # the classes have colours


def test_missing_metrics_and_a_missing_delta():
    summary = {"base": {"loss": 2.0, "rougeL": 0.5}, "tuned": {"loss": 1.5}}  # no delta, rougeL only for base
    cells = parse(render_html(summary, [], title="j"))
    assert cells.metrics["loss"]["delta"] == "-0.5000" and cells.metrics["loss"]["verdict"] == "better"
    assert cells.metrics["rougeL"]["tuned"] == "-" and cells.metrics["rougeL"]["verdict"] == ""
    assert "No prompts were answered." in render_html(summary, [], title="j")
    assert "No metrics" in render_html({}, [], title="j")


def test_load_rows_reads_answers_jsonl():
    text = "\n".join(json.dumps(r) for r in ROWS) + "\n\n"
    assert load_rows(text) == ROWS


@pytest.mark.parametrize(
    "line,rule",
    [
        ("[1, 2]", "not a JSON object"),
        ("{oops", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        ('{"prompt": "p", "tuned": "t"}', '"base" is missing'),
        ('{"prompt": 3, "base": "b", "tuned": "t"}', '"prompt" must be a string'),
        ('{"prompt": "p", "base": "b", "tuned": "t", "reference": 4}', '"reference" must be a string or null'),
        ('{"index": "0", "prompt": "p", "base": "b", "tuned": "t"}', '"index" must be a non-negative integer'),
        ('{"prompt": "p", "base": "b", "tuned": "t", "scores": []}', '"scores" must be an object'),
        ('{"prompt": "p", "base": "b", "tuned": "t", "scores": {"base": {"rougeL": "x"}}}',
         '"scores.base.rougeL" must be a number'),
    ],
)  # fmt: skip
def test_load_rows_names_the_line_and_the_rule(line, rule):
    good = json.dumps(ROWS[0])
    with pytest.raises(ValueError) as e:
        load_rows(f"{good}\n\n{line}\n{good}\n")
    assert str(e.value) == f"answers.jsonl line 3: {rule}"
    with pytest.raises(ValueError, match=r"^s3://b/eval/answers.jsonl line 1: "):
        load_rows(line, "s3://b/eval/answers.jsonl")


def test_terminal_table_wraps_at_the_width():
    long = "word " * 60 + "\n" + "x" * 150
    rows = [*ROWS, {"index": 3, "prompt": "long one", "reference": None, "base": long, "tuned": "short"}]
    for width in (40, 60, 100):
        text = render_table(SUMMARY, rows, width)
        lines = text.splitlines()
        assert max(len(ln) for ln in lines) <= width
        assert any(len(ln) > width - 12 for ln in lines)  # it uses the width, not a fixed narrow one
    text = render_table(SUMMARY, rows, 60)
    assert re.search(r"^loss\s+2\.5000\s+1\.2500\s+-1\.2500\s+better$", text, re.M)
    assert re.search(r"^ROUGE-L\s+0\.3100\s+0\.2000\s+-0\.1100\s+worse$", text, re.M)
    assert "--- prompt 3 " in text and "tuned: (EM 1 · ROUGE-L 1.0000)" in text
    assert "    The answer is four.\n    I think.\n" in text  # the answer's own newlines are kept
    assert re.search(r"\.\.\. \(\d+ more lines: --html shows all\)", text)  # the long answer is cut
    assert "short" in text


def test_terminal_table_shows_control_characters_instead_of_obeying_them():
    rows = [{"index": 0, "prompt": "p", "reference": None, "base": "\x1b[2J\x1b]0;pwned\x07", "tuned": "ok\r"}]
    text = render_table({}, rows, 80)
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "\\x1b[2J\\x1b]0;pwned\\x07" in text and "no metrics in summary.json" in text
