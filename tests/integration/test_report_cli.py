"""`kubetune report NAME` against the real test ground: the FineTuneJob from the apiserver, its status.result
patched in as the operator writes it, summary.json and answers.jsonl in the ground's S3 server read with the
job's own credentials Secret. No operator runs here (the jobs are suspended in case one does)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kubetune.cli import main

from opkit import apply, example

pytestmark = pytest.mark.integration

SUMMARY = {
    "split": "test",
    "examples": 40,
    "prompts": 2,
    "generation": {"maxNewTokens": 32, "temperature": 0.0},
    "base": {"loss": 2.2, "perplexity": 9.03, "tokenAccuracy": 0.4, "exactMatch": 0.0, "rougeL": 0.25},
    "tuned": {"loss": 1.1, "perplexity": 3.0, "tokenAccuracy": 0.7, "exactMatch": 0.5, "rougeL": 0.6},
    "delta": {"loss": -1.1, "perplexity": -6.03, "tokenAccuracy": 0.3, "exactMatch": 0.5, "rougeL": 0.35},
}
ROWS = [
    {"index": 0, "prompt": "What is 2+2?", "reference": "4", "base": "It is four, " + "I think, " * 30,
     "tuned": "4", "scores": {"base": {"exactMatch": 0, "rougeL": 0.0}, "tuned": {"exactMatch": 1, "rougeL": 1.0}}},
    {"index": 1, "prompt": "Say hi", "reference": None, "base": "<script>alert(1)</script>", "tuned": "hi"},
]  # fmt: skip


def _job(ground, name: str, evaluation: bool = True) -> dict:
    return example("quickstart", **{
        "metadata.name": name,
        "spec.runPolicy.suspend": True,
        "spec.storage.endpoint": ground.state["s3"]["endpoint"],
        "spec.evaluation": {"prompts": [{"prompt": "Say hi"}]} if evaluation else None,
        **({} if evaluation else {"spec.dataset.testSplit": None}),  # no test data either: nothing evaluated
    })  # fmt: skip


def _patch_result(ground, ns: str, name: str, result: dict) -> None:
    ground.kubectl("patch", "ftj", name, "-n", ns, "--subresource=status", "--type=merge", "-p",
                   json.dumps({"status": {"phase": "Succeeded", "result": result}}))  # fmt: skip


def _upload(ground, ns: str, name: str) -> str:
    """The trainer's three objects under an output prefix; the reportUri."""
    prefix = f"it-report/{ns}/{name}/evaluation"
    s3 = ground.s3()
    s3.put_object(Bucket="kubetune", Key=f"{prefix}/summary.json", Body=json.dumps(SUMMARY).encode())
    s3.put_object(Bucket="kubetune", Key=f"{prefix}/answers.jsonl",
                  Body="".join(json.dumps(r) + "\n" for r in ROWS).encode())  # fmt: skip
    s3.put_object(Bucket="kubetune", Key=f"{prefix}/report.html", Body=b"<!DOCTYPE html>")
    return f"s3://kubetune/{prefix}/report.html"


def _report(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["report", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_report_prints_the_table_and_writes_the_page(ground, crds, ns, tmp_path):
    apply(ground, ns, _job(ground, "evald"))
    uri = _upload(ground, ns, "evald")
    _patch_result(ground, ns, "evald", {"reportUri": uri, "evaluation": {
        k: SUMMARY[k] for k in ("base", "tuned", "delta")}})  # fmt: skip
    page = tmp_path / "report.html"
    # the console script itself, as a user runs it
    r = subprocess.run([sys.executable, "-m", "kubetune.cli", "report", "evald", "-n", ns, "--width", "70",
                        "--html", str(page)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"FineTuneJob {ns}/evald: evaluation from s3://kubetune/it-report/{ns}/evald/evaluation/" in out
    lines = out.splitlines()
    assert max(len(ln) for ln in lines[1:-1]) <= 70  # the header and the "wrote" line name paths
    assert any(ln.split() == ["loss", "2.2000", "1.1000", "-1.1000", "better"] for ln in lines)
    assert any(ln.split() == ["perplexity", "9.03", "3.00", "-6.03", "better"] for ln in lines)
    assert "--- prompt 1 " in out and "    <script>alert(1)</script>" in out and "tuned: (EM 1 · ROUGE-L" in out
    assert lines[-1] == f"wrote {page}"
    html = page.read_text()
    assert f"Evaluation: {ns}/evald" in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>" not in html


def test_report_before_the_run_ends(ground, crds, ns, capsys):
    apply(ground, ns, _job(ground, "running"))
    rc, out, err = _report(capsys, "running", "-n", ns)
    assert rc == 2 and not out
    assert f"FineTuneJob {ns}/running has no result yet (still " in err
    assert "the report is written when the run ends" in err


def test_report_of_a_job_without_evaluation(ground, crds, ns, capsys):
    apply(ground, ns, _job(ground, "plain", evaluation=False))
    _patch_result(ground, ns, "plain", {"adapterUri": "s3://kubetune/out/plain/", "metrics": {"trainLoss": 1.0}})
    rc, _, err = _report(capsys, "plain", "-n", ns)
    assert rc == 2 and "spec.evaluation is not set" in err


def test_report_of_no_such_job(ground, crds, ns, capsys):
    rc, _, err = _report(capsys, "nope", "-n", ns)
    assert rc == 2 and f"FineTuneJob 'nope' not found in namespace {ns}" in err


def test_report_s3_errors_name_the_uri_not_the_secret(ground, crds, ns, capsys):
    apply(ground, ns, _job(ground, "gone"))
    _patch_result(ground, ns, "gone", {"reportUri": "s3://kubetune/it-report/missing/evaluation/report.html"})
    rc, _, err = _report(capsys, "gone", "-n", ns)
    assert rc == 2
    assert "cannot read s3://kubetune/it-report/missing/evaluation/summary.json: it does not exist" in err

    # a wrong secret key: refused, and neither key is echoed
    wrong = "not-the-secret-" + "x" * 20
    ground.kubectl("create", "secret", "generic", "bad-s3", "-n", ns,
                   f"--from-literal=AWS_ACCESS_KEY_ID={ground.state['s3']['access_key']}",
                   f"--from-literal=AWS_SECRET_ACCESS_KEY={wrong}")  # fmt: skip
    job = _job(ground, "badcreds")
    job["spec"]["storage"]["credentialsSecret"] = {"name": "bad-s3"}
    apply(ground, ns, job)
    _patch_result(ground, ns, "badcreds", {"reportUri": _upload(ground, ns, "badcreds")})
    rc, _, err = _report(capsys, "badcreds", "-n", ns)
    assert rc == 2 and f"cannot read s3://kubetune/it-report/{ns}/badcreds/evaluation/summary.json" in err
    assert "refused the credentials" in err
    assert wrong not in err and ground.state["s3"]["access_key"] not in err

    # an endpoint that does not answer (a cluster-internal address seen from outside): named, with the URI
    rc, _, err = _report(capsys, "badcreds", "-n", ns, "--s3-endpoint", "http://127.0.0.1:9")
    assert rc == 2 and f"cannot read s3://kubetune/it-report/{ns}/badcreds/evaluation/summary.json: " in err
    assert "EndpointConnectionError" in err and "http://127.0.0.1:9" in err and wrong not in err
