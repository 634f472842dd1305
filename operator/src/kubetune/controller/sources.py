"""What the operator reads from outside Kubernetes: a model's config.json (when the model is not in
the catalog) and the trainer's progress object in S3. Both use the job's own storage settings and
credentials, so the operator sees exactly what the trainer sees. The Hub reader is kubetune.hub (below
the controller and the estimator, which both use it); its names stay importable from here."""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from kubetune.api.storage import join_key, s3_uri, split_s3_uri
from kubetune.api.v1alpha1 import FineTuneJobSpec, TrainerProgress
from kubetune.controller.egress import EgressPolicy
from kubetune.errors import UNTRUSTED_S3, certificate_untrusted
from kubetune.hub import HUB, MAX_BODY_BYTES, hub_endpoint, read_capped, read_hub_config  # noqa: F401

# S3 error codes that mean the credentials, not the object, are wrong
_CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
)


class CredentialsRefused(ValueError):
    """S3 refused the job's credentials (as opposed to a missing object)."""


def s3_error(e: BaseException, action: str, where: str) -> ValueError:
    """One line about a failed S3 call that never echoes the response body (a hostile endpoint
    chooses it): the error code and HTTP status only, and what to fix."""
    from botocore.exceptions import ClientError

    if certificate_untrusted(e):
        return ValueError(f"cannot {action} {where}: {UNTRUSTED_S3}")
    if isinstance(e, ClientError):
        code = str((e.response.get("Error") or {}).get("Code") or "")[:64]
        http = (e.response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in _CREDENTIAL_CODES or http == 403:
            return CredentialsRefused(
                f"cannot {action} {where}: the S3 endpoint refused the credentials ({code or 'HTTP 403'}): check the "
                "access key id and secret key in the Secret named by spec.storage.credentialsSecret, and that they may "
                "read this bucket"
            )
        if code in ("NoSuchKey", "NoSuchBucket", "404"):
            return ValueError(f"cannot {action} {where}: it does not exist ({code})")
        return ValueError(
            f"cannot {action} {where}: the S3 endpoint answered {code or 'an error'}"
            + (f" (HTTP {http})" if http else "")
        )
    return ValueError(f"cannot {action} {where}: {type(e).__name__}: {e}")


def _ca_file(pem: str) -> str:
    """spec.storage.caBundle as a file, which is what boto3 verifies against; named by its hash, so one per
    bundle whoever writes it."""
    path = Path(tempfile.gettempdir()) / f"kubetune-ca-{hashlib.sha256(pem.encode()).hexdigest()[:16]}.pem"
    path.write_text(pem)
    return str(path)


def _new_client(
    endpoint: str | None, region: str | None, key: str | None, secret: str | None, path_style: bool, ca_pem: str | None
):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=region or "us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        verify=_ca_file(ca_pem) if ca_pem else None,
        config=Config(
            s3={"addressing_style": "path" if path_style else "auto"},
            retries={"max_attempts": 2, "mode": "standard"},
            connect_timeout=3,
            read_timeout=5,
        ),
    )


class S3Clients:
    """boto3 clients by endpoint, region, credentials and CA bundle, the newest ``size`` kept: one per
    OperatorState (a reconcile reads progress every few seconds; a client per read would redo TLS). A
    lock, since boto3's sessions are not thread-safe to create clients from."""

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._clients: OrderedDict[tuple, object] = OrderedDict()

    def get(self, *key):
        with self._lock:
            if key in self._clients:
                self._clients.move_to_end(key)
                return self._clients[key]
            client = self._clients[key] = _new_client(*key)
            if len(self._clients) > self.size:
                self._clients.popitem(last=False)
            return client


def s3_client(
    spec: FineTuneJobSpec,
    creds: dict[str, str] | None,
    ca_pem: str | None = None,
    egress: EgressPolicy | None = None,
    clients: S3Clients | None = None,
):
    """``creds``: the credentials Secret's data; ``ca_pem``: the caBundle ConfigMap's key;
    ``egress``: the operator's rule for which endpoints it may call (EndpointRefused otherwise);
    ``clients``: the operator's client cache (a one-off client without it)."""
    st = spec.storage
    if egress is not None and st.endpoint:
        egress.check(st.endpoint, "spec.storage.endpoint")
    key = secret = None
    if creds is not None and st.credentials_secret is not None:
        key = creds.get(st.credentials_secret.access_key_id_key)
        secret = creds.get(st.credentials_secret.secret_access_key_key)
    args = (st.endpoint, st.region, key, secret, st.force_path_style, ca_pem)
    return clients.get(*args) if clients is not None else _new_client(*args)


def read_progress(
    spec: FineTuneJobSpec,
    creds: dict[str, str] | None,
    uri: str,
    ca_pem: str | None = None,
    egress: EgressPolicy | None = None,
    clients: S3Clients | None = None,
) -> tuple[TrainerProgress | None, str | None]:
    """The trainer's progress JSON (None when it has not written one yet), and why it could not be
    read when S3 did not answer or refused (None when it did). Progress is informative: it must never
    fail a reconcile, but an outage must show rather than freeze the status without a word."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, key = split_s3_uri(uri)
    try:
        body = read_capped(
            s3_client(spec, creds, ca_pem, egress, clients).get_object(Bucket=bucket, Key=key)["Body"],
            "the trainer's progress object",
        )
        return TrainerProgress.model_validate(json.loads(body)), None
    except NoCredentialsError:  # no credentialsSecret: the trainer's may come from its ServiceAccount, not ours
        return None, None
    except ClientError as e:
        if str((e.response.get("Error") or {}).get("Code") or "") in ("NoSuchKey", "404"):
            return None, None  # not written yet
        return None, str(s3_error(e, "read the trainer's progress", uri))
    except BotoCoreError as e:  # no answer: connection refused or reset, timeouts, DNS
        return None, str(s3_error(e, "read the trainer's progress", uri))
    except ValueError:  # not progress JSON (or over the cap): the trainer rewrites it at the next step
        return None, None


def read_config_json(
    spec: FineTuneJobSpec,
    creds: dict[str, str] | None,
    hf_token: str | None = None,
    hub: str | None = None,
    ca_pem: str | None = None,
    egress: EgressPolicy | None = None,
    clients: S3Clients | None = None,
) -> str:
    """config.json text for a model that is not in the catalog, from S3 or the Hub (``hub``: the
    operator's --hf-endpoint mirror, else huggingface.co). Raises ValueError with a message naming
    what to fix when it cannot be read."""
    uri = spec.model.uri
    if uri.startswith("s3://"):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(uri)
        key = join_key(prefix, "config.json")
        where = s3_uri(bucket, key)
        s3 = s3_client(spec, creds, ca_pem, egress, clients)
        try:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as e:
            raise s3_error(e, "read", where) from None
        try:
            return read_capped(body, where).decode()
        except UnicodeDecodeError:
            raise ValueError(f"{where} is not UTF-8 text, so not a config.json") from None
    if uri.startswith("hf://"):
        return read_hub_config(uri, hf_token, hub, ca_pem=ca_pem)
    raise ValueError(f"the operator cannot read {uri.split('://')[0]}:// models")


def delete_prefix(
    spec: FineTuneJobSpec,
    creds: dict[str, str] | None,
    uri: str,
    ca_pem: str | None = None,
    egress: EgressPolicy | None = None,
    clients: S3Clients | None = None,
) -> int:
    """Delete every object under an S3 prefix (checkpoints.deletionPolicy: Delete). Returns how many."""
    bucket, prefix = split_s3_uri(uri)
    return delete_under(s3_client(spec, creds, ca_pem, egress, clients), bucket, prefix)


def delete_under(s3, bucket: str, prefix: str) -> int:
    """Delete every object under ``prefix`` with an S3 client: one request per listed page (up to 1000
    keys, DeleteObjects' limit too). Returns how many."""
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents") or []]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            n += len(keys)
    return n
