"""The evaluation report page in a real headless browser (Debian's chromium): it renders (a non-blank
screenshot), the DOM has the metric and answer rows, and an answer's <script> stays text.

No test ground needed. chromium is installed once per session with apt-get when it is not on PATH (it is
in Debian bookworm's main and security archives: a fresh CI container running as root gets it here); the
tests skip, saying why, only when that install fails. Chromium loads the page from file:// only: no proxy,
every host name resolves to nothing, background networking off.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from kubetune.report import render_html

pytestmark = pytest.mark.integration

ALERT = "<script>alert(1)</script>"
HIJACK = "<script>document.title = 'pwned'</script>"
TITLE = "kubetune evaluation: team-a/sft-qwen"

SUMMARY = {
    "split": "test",
    "examples": 120,
    "prompts": 3,
    "generation": {"maxNewTokens": 64, "temperature": 0.0},
    "base": {"loss": 2.41, "perplexity": 11.13, "tokenAccuracy": 0.43, "exactMatch": 0.0, "rougeL": 0.35},
    "tuned": {"loss": 1.12, "perplexity": 3.06, "tokenAccuracy": 0.71, "exactMatch": 0.5, "rougeL": 0.3},
    "delta": {"loss": -1.29, "perplexity": -8.07, "tokenAccuracy": 0.28, "exactMatch": 0.5, "rougeL": -0.05},
}
ROWS = [
    {"index": 0, "prompt": "What is 2+2?", "reference": "4", "base": "The answer is four.\nProbably.",
     "tuned": "4", "scores": {"base": {"exactMatch": 0, "rougeL": 0.0}, "tuned": {"exactMatch": 1, "rougeL": 1.0}}},
    {"index": 1, "prompt": f"Repeat after me: {HIJACK}", "reference": None, "base": ALERT, "tuned": "I won't."},
    {"index": 2, "prompt": "Capital of France?", "reference": "Paris <img src=x onerror=alert(2)>",
     "base": "Paris", "tuned": "Paris.",
     "scores": {"base": {"exactMatch": 1, "rougeL": 0.67}, "tuned": {"exactMatch": 0, "rougeL": 0.67}}},
]  # fmt: skip

# Keep chromium on the machine: nothing but the file:// page is fetched.
ISOLATION = [
    "--headless=new",
    "--no-sandbox",  # CI containers run as root, where chromium's sandbox cannot start
    "--disable-gpu",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,DialMediaRouteProvider",
]


def _install_chromium() -> str | None:
    """chromium from PATH, else apt-get installed (as root, or through passwordless sudo); None when it
    cannot be."""
    if found := shutil.which("chromium"):
        return found
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               "chromium"]  # fmt: skip
    for cmd in ([*install], [*sudo, "apt-get", "update"], [*install]):  # update only if the lists are stale
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if r.returncode == 0 and cmd[-1] == "chromium":
            return shutil.which("chromium")
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _install_chromium()
    if path is None:
        pytest.skip("chromium is not on PATH and `apt-get install chromium` failed (not root, or no Debian archive)")
    return path


@pytest.fixture(scope="module")
def browse(chromium, tmp_path_factory):
    """browse(page_path, *flags) -> stdout: one headless chromium run on a file:// URL, in its own profile."""
    home = tmp_path_factory.mktemp("chromium")

    def run(page: Path, *flags: str) -> str:
        cmd = [chromium, *ISOLATION, f"--user-data-dir={home / 'profile'}", *flags, page.resolve().as_uri()]
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "LANG": "C.UTF-8"}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=home)
        assert r.returncode == 0, f"chromium exited {r.returncode}: {r.stderr[-3000:]}"
        return r.stdout

    return run


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(render_html(SUMMARY, ROWS, title="team-a/sft-qwen"), encoding="utf-8")
    return path


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct scanlines) of an 8-bit PNG. A single-colour image has a handful of distinct
    filtered scanlines whatever filters the encoder chose (each is the filter byte plus one pixel repeated,
    or zeros); a rendered page has hundreds."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert ihdr is not None, "no IHDR chunk"
    width, height, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unexpected PNG format {ihdr}"
    stride = 1 + width * (3 if colour == 2 else 4)
    raw = zlib.decompress(idat)
    assert len(raw) == stride * height, "truncated image data"
    return width, height, len({raw[i : i + stride] for i in range(0, len(raw), stride)})


class _Dom(HTMLParser):
    """The dumped DOM's title, tags, answer rows (cell class -> text) and metric rows' delta verdicts."""

    def __init__(self):
        super().__init__()
        self.title, self.tags, self.rows, self.verdicts = "", [], [], {}
        self._in, self._row, self._cell, self._metric = None, None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "title":
            self._in = "title"
        elif tag == "tr" and "answer" in (a.get("class") or ""):
            self._row = {}
            self.rows.append(self._row)
        elif tag == "tr" and a.get("data-metric"):
            self._metric = a["data-metric"]
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split(" ")[0]
            self._row[self._cell] = ""
        elif tag == "td" and self._metric and "delta" in (a.get("class") or ""):
            self.verdicts[self._metric] = a.get("data-verdict")

    def handle_endtag(self, tag):
        if tag == "title":
            self._in = None
        elif tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = self._metric = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        if self._row is not None and self._cell:
            self._row[self._cell] += data


def test_the_page_renders_as_a_non_blank_screenshot(browse, page):
    shot = page.parent / "out.png"
    browse(page, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    width, height, distinct = png_facts(shot.read_bytes())
    assert (width, height) == (1280, 1600)
    assert distinct > 50, f"the screenshot looks blank: only {distinct} distinct scanlines"


def test_the_dom_has_the_rows_and_no_script_ran(browse, page):
    dom_text = browse(page, "--dump-dom", "--virtual-time-budget=2000")  # time for a script to have run
    dom = _Dom()
    dom.feed(dom_text)
    assert dom.title == TITLE, "a script in the data changed document.title"
    assert "script" not in dom.tags and "img" not in dom.tags
    assert [r["index"] for r in dom.rows] == ["0", "1", "2"]
    assert dom.rows[0]["base"].startswith("The answer is four.\nProbably.")
    assert dom.rows[1]["prompt"] == f"Repeat after me: {HIJACK}"  # shown as text
    assert dom.rows[1]["base"] == ALERT and dom.rows[1]["reference"] == "none"
    assert dom.rows[2]["reference"] == "Paris <img src=x onerror=alert(2)>"
    assert dom.verdicts == {
        "loss": "better",
        "perplexity": "better",
        "tokenAccuracy": "better",
        "exactMatch": "better",
        "rougeL": "worse",
    }
    assert re.search(r"Answers \(3 prompts\)", dom_text)


def test_this_chromium_does_run_scripts_so_the_check_above_means_something(browse, tmp_path):
    control = tmp_path / "control.html"
    control.write_text(f"<!DOCTYPE html><html><head><title>{TITLE}</title></head><body>{HIJACK}</body></html>")
    dom = _Dom()
    dom.feed(browse(control, "--dump-dom", "--virtual-time-budget=2000"))
    assert dom.title == "pwned"
