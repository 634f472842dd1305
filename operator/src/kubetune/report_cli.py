"""`kubetune report NAME`: a FineTuneJob's end-of-run evaluation (base vs tuned) in the terminal, or as
the HTML page.

It reads the job from the current kubeconfig, finds status.result.reportUri and reads summary.json and
answers.jsonl beside it with the job's own storage settings (endpoint, region, credentials Secret, CA
bundle), through the operator's S3 client: the user sees what the trainer wrote, with the same access.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

from kubetune.errors import UsageError

# answers.jsonl holds up to evaluation.maxPrompts (10000) prompts with two answers each
MAX_ANSWERS_BYTES = 64 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="FineTuneJob name")
    p.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else default)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    p.add_argument("--html", metavar="FILE", help="also write the report page to FILE")
    p.add_argument("--open", action="store_true", help="open the report page in a browser (a temporary file "
                   "without --html)")  # fmt: skip
    p.add_argument("--width", type=int, help="terminal table width (default: the terminal's)")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="reach S3 at URL instead of spec.storage.endpoint (e.g. through kubectl port-forward when the "
        "endpoint is a cluster-internal address)",
    )


def run(args: argparse.Namespace) -> int:
    from kubetune import report

    kube, ns = _connect(args.kubeconfig, args.namespace)
    job = _get_job(kube, ns, args.name)
    report_uri = _report_uri(job, ns, args.name)
    s3, folder = _s3_for(kube, ns, job, report_uri, args.s3_endpoint)

    summary_uri, answers_uri = (_sibling(report_uri, f) for f in ("summary.json", "answers.jsonl"))
    summary = _read_json_object(_read(s3, summary_uri), summary_uri)
    try:
        rows = report.load_rows(_read(s3, answers_uri, MAX_ANSWERS_BYTES), answers_uri)
    except ValueError as e:
        raise UsageError(str(e)) from None

    width = args.width or shutil.get_terminal_size((100, 24)).columns
    print(f"FineTuneJob {ns}/{args.name}: evaluation from {folder}")
    sys.stdout.write(report.render_table(summary, rows, width))

    if args.html or args.open:
        page = report.render_html(summary, rows, f"{ns}/{args.name}")
        path = Path(args.html) if args.html else _temp_page(ns, args.name)
        try:
            path.write_text(page, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
        print(f"wrote {path}")
        if args.open:
            import webbrowser

            if not webbrowser.open(path.resolve().as_uri()):
                print(f"no browser to open {path} with: open it yourself", file=sys.stderr)
    return 0


def _connect(kubeconfig: str | None, namespace: str | None):
    """(Kube, namespace): the operator's client on the kubeconfig (in-cluster config inside a pod)."""
    import os

    from kubernetes import config

    from kubetune.controller.kube import Kube

    # $KUBECONFIG now, not when the kubernetes package was imported (its default is read at import)
    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        kube = Kube.connect(kubeconfig, pool_size=4)
    except (config.ConfigException, OSError) as e:
        raise UsageError(f"cannot load the kubeconfig: {e}") from None
    if namespace:
        return kube, namespace
    try:
        _, current = config.list_kube_config_contexts(config_file=kubeconfig)
        return kube, (current or {}).get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError):  # in-cluster: no contexts
        return kube, "default"


def _api_error(e: Exception, what: str) -> UsageError:
    """One line for a failed API call: the HTTP status and reason, not the response body."""
    from kubetune.controller.kube import ApiException

    if isinstance(e, ApiException):
        if e.status in (401, 403):
            return UsageError(f"not allowed to {what} (HTTP {e.status} {e.reason}): check your kubeconfig's RBAC")
        return UsageError(f"cannot {what}: the API server answered HTTP {e.status} {e.reason}")
    return UsageError(f"cannot {what}: cannot reach the API server ({type(e).__name__})")


def _get_job(kube, ns: str, name: str) -> dict:
    try:
        job = kube.get_finetunejob(ns, name)
    except Exception as e:  # ApiException, or urllib3's connection errors
        raise _api_error(e, f"read FineTuneJob {ns}/{name}") from None
    if job is None:
        raise UsageError(f"FineTuneJob {name!r} not found in namespace {ns} (kubectl get finetunejobs -n {ns})")
    return job


def _report_uri(job: dict, ns: str, name: str) -> str:
    """status.result.reportUri, or a UsageError saying why there is none."""
    status = job.get("status") or {}
    result = status.get("result") or {}
    if not result:
        phase = status.get("phase") or "Pending"
        if phase == "Failed":
            raise UsageError(f"FineTuneJob {ns}/{name} failed without a result: no evaluation report was written")
        raise UsageError(
            f"FineTuneJob {ns}/{name} has no result yet (still {phase}): the report is written when the run ends"
        )
    uri = result.get("reportUri")
    if uri:
        return str(uri)
    spec = job.get("spec") or {}
    dataset = spec.get("dataset") or {}
    if not (spec.get("evaluation") or dataset.get("testSplit") or dataset.get("testUri")):
        raise UsageError(
            f"FineTuneJob {ns}/{name} has no evaluation in its result: spec.evaluation is not set and there is no "
            "test data, so the run compared no answers (set dataset.testSplit or spec.evaluation.prompts, and run "
            "it again)"
        )
    raise UsageError(
        f"FineTuneJob {ns}/{name} has test data or spec.evaluation but its result has no reportUri: the trainer "
        "wrote no report (see the job's conditions and the trainer's log)"
    )


def _sibling(uri: str, name: str) -> str:
    """The object ``name`` in the same folder as ``uri``."""
    from kubetune.api.storage import join_key, s3_uri, split_s3_uri

    bucket, key = split_s3_uri(uri)
    return s3_uri(bucket, join_key(key.rpartition("/")[0], name))


def _s3_for(kube, ns: str, job: dict, report_uri: str, endpoint: str | None):
    """(boto3 client, report folder URI) built from the job's spec.storage as the operator builds it."""
    from pydantic import ValidationError

    from kubetune.api.storage import split_s3_uri
    from kubetune.api.v1alpha1 import Storage
    from kubetune.controller import sources
    from kubetune.controller.kube import NOT_TEXT

    try:
        split_s3_uri(report_uri)
    except ValueError as e:
        raise UsageError(f"status.result.reportUri: {e}") from None
    try:
        storage = Storage.model_validate((job.get("spec") or {}).get("storage") or {})
    except ValidationError as e:
        raise UsageError(f"spec.storage of FineTuneJob {ns}/{job['metadata']['name']} is not valid: {e}") from None
    if endpoint:
        storage = storage.model_copy(update={"endpoint": endpoint})

    creds = None
    if (ref := storage.credentials_secret) is not None:
        try:
            creds = kube.read_secret(ns, ref.name)
        except Exception as e:
            raise _api_error(e, f"read Secret {ns}/{ref.name} (spec.storage.credentialsSecret)") from None
        if creds is None:
            raise UsageError(f"Secret {ref.name!r} (spec.storage.credentialsSecret) does not exist in namespace {ns}")
        for key in (ref.access_key_id_key, ref.secret_access_key_key):
            if not creds.get(key):
                raise UsageError(f"Secret {ref.name!r} (spec.storage.credentialsSecret) has no key {key}")
            if creds[key] == NOT_TEXT:
                raise UsageError(f"Secret {ref.name!r} (spec.storage.credentialsSecret): key {key} is not UTF-8 text")
    ca_pem = None
    if (ca := storage.ca_bundle) is not None:
        try:
            data = kube.read_config_map(ns, ca.name)
        except Exception as e:
            raise _api_error(e, f"read ConfigMap {ns}/{ca.name} (spec.storage.caBundle)") from None
        ca_pem = (data or {}).get(ca.key)
        if not ca_pem:
            raise UsageError(f"ConfigMap {ca.name!r} (spec.storage.caBundle) in namespace {ns} has no key {ca.key}")
    # s3_client reads only spec.storage: the rest of the spec need not parse with this version's models
    client = sources.s3_client(SimpleNamespace(storage=storage), creds, ca_pem)  # type: ignore[arg-type]
    return client, _sibling(report_uri, "") + "/"


def _read(s3, uri: str, limit: int | None = None) -> str:
    """An object's text. Errors name the URI and the S3 error code, never a credential or the body."""
    from botocore.exceptions import BotoCoreError, ClientError

    from kubetune.api.storage import split_s3_uri
    from kubetune.controller.sources import s3_error
    from kubetune.hub import MAX_BODY_BYTES, read_capped

    bucket, key = split_s3_uri(uri)
    try:
        body = read_capped(s3.get_object(Bucket=bucket, Key=key)["Body"], uri, limit or MAX_BODY_BYTES)
    except (ClientError, BotoCoreError) as e:
        raise UsageError(str(s3_error(e, "read", uri))) from None
    except ValueError as e:  # larger than the cap
        raise UsageError(str(e)) from None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{uri} is not UTF-8 text") from None


def _read_json_object(text: str, uri: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{uri}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{uri}: not a JSON object")
    return obj


def _temp_page(ns: str, name: str) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="kubetune-report-")) / f"{ns}-{name}.html"
