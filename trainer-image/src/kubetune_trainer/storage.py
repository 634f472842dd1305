"""Where things live: s3://, pvc://, file:// and plain local paths behind one small interface.

- s3://bucket/prefix: boto3, honouring spec.storage (endpoint, region, path-style addressing) and the
  standard credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the Secret the operator
  mounts as env, or the pod's ambient identity). Endpoint-agnostic: AWS, MinIO, s3s-fs, moto...
- pvc://claim/path: the claim is mounted at $KUBETUNE_PVC_ROOT/<claim> (default /mnt/pvc/<claim>).
- file:///path and plain paths: the local filesystem.

The KUBETUNE_* knobs here (PVC root, S3 retries and timeouts) are read by knobs.Knobs; a caller passes
its Knobs, else the run's installed ones (knobs.current()) apply.

Downloads of whole trees (models, data prefixes) are resumable (a ``.part`` file continues with an
HTTP Range request; complete files whose size and checksum are recorded are skipped) and verified
(sha256 from a kubetune manifest or the object's ``sha256`` metadata, else the MD5 ETag, else size).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from kubetune.api.storage import join_key, retry, s3_uri, split_s3_uri
from kubetune.errors import UNTRUSTED_S3, certificate_untrusted, untrusted
from kubetune_trainer import knobs as kn
from kubetune_trainer.errors import BadConfig, StorageFailed
from kubetune_trainer.knobs import Knobs

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the location's prefix
    size: int
    etag: str | None = None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path: str | Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def pvc_root(knobs: Knobs | None = None) -> Path:
    return Path((knobs or kn.current()).pvc_root)


def local_path_of(uri: str, knobs: Knobs | None = None) -> Path | None:
    """The filesystem path of a pvc://, file:// or plain-path URI; None for remote URIs."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://"):].partition("/")
        return pvc_root(knobs) / claim / rest
    if "://" in uri:
        return None
    return Path(uri)


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) as the operator splits it too (kubetune.api.storage); BadConfig when it is no s3:// URI."""
    try:
        return split_s3_uri(uri)
    except ValueError as e:
        raise BadConfig(str(e)) from None


_join = join_key  # the trainer's modules and tests call st._join


class Location:
    """A prefix (a 'directory') in some store. Keys are relative to it and use '/'."""

    uri: str

    def child(self, key: str) -> "Location":
        raise NotImplementedError

    def put_file(self, key: str, local: str | Path, sha256: str | None = None) -> None:
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get_bytes(self, key: str) -> bytes | None:
        """The object's content, or None when it does not exist."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under prefix (recursive), keys relative to this location."""
        raise NotImplementedError

    def list_dirs(self) -> list[str]:
        """Names of the immediate sub-prefixes."""
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        raise NotImplementedError

    def download(self, key: str, dest: Path, size: int, etag: str | None, sha256: str | None) -> None:
        raise NotImplementedError

    def head_sha256(self, key: str) -> str | None:
        return None


class LocalLocation(Location):
    def __init__(self, root: Path, uri: str | None = None):
        self.root = Path(root)
        self.uri = uri or f"file://{self.root}"

    def child(self, key: str) -> "LocalLocation":
        return LocalLocation(self.root / key, _join(self.uri, key))

    def _p(self, key: str) -> Path:
        return self.root / key if key else self.root

    def _tmp(self, key: str) -> tuple[Path, Path]:
        """The destination and a temporary beside it that no other writer shares: two threads writing
        one key (the progress thread and a checkpoint commit) through one shared temporary interleave
        their bytes, and the rename then publishes one document with the other's tail."""
        dst = self._p(key)
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst, dst.with_name(f"{dst.name}.{os.getpid()}.{threading.get_ident()}.tmp")

    def put_file(self, key, local, sha256=None):
        dst, tmp = self._tmp(key)
        shutil.copyfile(local, tmp)
        os.replace(tmp, dst)

    def put_bytes(self, key, data):
        dst, tmp = self._tmp(key)
        tmp.write_bytes(data)
        os.replace(tmp, dst)

    def get_bytes(self, key):
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, prefix=""):
        base = self._p(prefix)
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        if not base.is_dir():
            return []
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file() and not p.name.endswith(".tmp"):
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return out

    def list_dirs(self):
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def delete(self, keys):
        for k in keys:
            p = self._p(k)
            if p.is_file():
                p.unlink()
        # prune empty directories left behind
        if self.root.is_dir():
            for d in sorted((p for p in self.root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                try:
                    d.rmdir()
                except OSError:
                    pass

    def download(self, key, dest, size, etag, sha256):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), dest)


class S3Location(Location):
    def __init__(self, client, bucket: str, prefix: str):
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = s3_uri(bucket, self.prefix)

    def child(self, key: str) -> "S3Location":
        return S3Location(self.client, self.bucket, _join(self.prefix, key))

    def _k(self, key: str) -> str:
        return _join(self.prefix, key)

    def put_file(self, key, local, sha256=None):
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        # upload_file: multipart above 8 MiB, with its own retries; our callers retry around it.
        self.client.upload_file(str(local), self.bucket, self._k(key), ExtraArgs=extra)

    def put_bytes(self, key, data):
        self.client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def get_bytes(self, key):
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        except Exception as e:  # botocore ClientError 404 from some servers
            if _is_not_found(e):
                return None
            raise

    def head_sha256(self, key):
        try:
            meta = self.client.head_object(Bucket=self.bucket, Key=self._k(key)).get("Metadata") or {}
        except Exception as e:
            if _is_not_found(e):
                return None
            raise
        return meta.get("sha256")

    def list(self, prefix=""):
        full = self._k(prefix)
        if full and not full.endswith("/") and prefix == "":
            full += "/"
        out = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for o in page.get("Contents", []):
                if o["Key"].endswith("/"):
                    continue  # "directory marker" objects
                out.append(ObjectInfo(o["Key"][strip:], int(o["Size"]), (o.get("ETag") or "").strip('"') or None))
        return out

    def list_dirs(self):
        full = self.prefix + "/" if self.prefix else ""
        names = []
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
        for page in pages:
            for cp in page.get("CommonPrefixes", []):
                names.append(cp["Prefix"][len(full):].rstrip("/"))
        return sorted(names)

    def delete(self, keys):
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            objs = [{"Key": self._k(k)} for k in keys[i:i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objs, "Quiet": True})

    def download(self, key, dest, size, etag, sha256):
        """Resumable: bytes already in ``dest.part`` are kept and the rest is fetched with a Range request."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have < size:
            kw = {"Range": f"bytes={have}-"} if have else {}
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kw)["Body"]
            with open(part, "ab") as f:
                for block in iter(lambda: body.read(CHUNK), b""):
                    f.write(block)
        elif not part.exists():
            part.touch()
        os.replace(part, dest)


def _is_not_found(e: Exception) -> bool:
    resp = getattr(e, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code", ""))
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code in ("404", "NoSuchKey", "NotFound") or status == 404


def s3_client(storage=None, knobs: Knobs | None = None):
    """A boto3 S3 client for spec.storage (endpoint, region, path style); credentials from the env
    (boto3's own variables), retries and timeouts from the knobs (the run's where none are given)."""
    import boto3
    from botocore.config import Config

    k = knobs or kn.current()
    env = os.environ
    endpoint = getattr(storage, "endpoint", None) or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = getattr(storage, "region", None) or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    path_style = getattr(storage, "force_path_style", True)
    cfg = Config(
        region_name=region,
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": k.s3_max_attempts, "mode": "standard"},
        connect_timeout=k.s3_connect_timeout,
        read_timeout=k.s3_read_timeout,
        # Recent botocore adds CRC checksums by default; some S3-compatible servers reject them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=cfg)


_CLIENTS: dict = {}


def open_location(uri: str, storage=None, knobs: Knobs | None = None) -> Location:
    """The Location of an s3://, pvc://, file:// URI or a local path."""
    if uri.startswith("s3://"):
        bucket, key = split_s3(uri)
        ident = (getattr(storage, "endpoint", None), getattr(storage, "region", None),
                 getattr(storage, "force_path_style", True))
        if ident not in _CLIENTS:
            _CLIENTS[ident] = s3_client(storage, knobs)
        return S3Location(_CLIENTS[ident], bucket, key)
    local = local_path_of(uri, knobs)
    if local is None:
        raise BadConfig(f"unsupported URI scheme: {uri} (expected s3://, pvc://, file:// or a path)")
    return LocalLocation(local, uri)


# ---------------------------------------------------------------------------------------------
# resumable, verified tree downloads

MANIFEST = "manifest.json"
_STATE = ".kubetune-download.json"


def _verify(path: Path, info: ObjectInfo, sha256: str | None) -> str | None:
    """None when the file checks out, else what is wrong."""
    size = path.stat().st_size
    if size != info.size:
        return f"size {size} != {info.size}"
    if sha256:
        got = sha256_file(path)
        return None if got == sha256 else f"sha256 {got[:12]}.. != {sha256[:12]}.."
    if info.etag and "-" not in info.etag and len(info.etag) == 32:
        got = md5_file(path)
        return None if got == info.etag else f"md5 {got} != ETag {info.etag}"
    return None


def download_tree(
    loc: Location,
    dest: Path,
    *,
    only: Callable[[str], bool] | None = None,
    attempts: int = 4,
    log: Callable[[str], None] = print,
    listed: list | None = None,
) -> list[Path]:
    """Mirror every object under ``loc`` into ``dest``; returns the local paths. ``listed``: the
    caller's listing of ``loc`` (list_objects), so a large prefix is not listed twice.

    Restartable: files recorded as verified (same size and ETag) are skipped, and a partial
    ``.part`` file is continued from where it stopped. Each file is verified after download.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if listed is None:
        listed = list_objects(loc, attempts=attempts, log=log)
    objs = [o for o in listed if only is None or only(o.key)]
    if not objs:
        raise StorageFailed(f"nothing found at {loc.uri}")
    shas: dict[str, str] = {}
    if any(o.key == MANIFEST for o in objs):
        try:
            man = json.loads(loc.get_bytes(MANIFEST) or b"{}")
            shas = {f["path"]: f["sha256"] for f in man.get("files", []) if "sha256" in f}
        except (ValueError, TypeError):
            shas = {}
    state_file = dest / _STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    out = []
    for o in objs:
        target = dest / o.key
        out.append(target)
        rec = state.get(o.key)
        if (rec and target.exists() and rec.get("size") == o.size and rec.get("etag") == o.etag
                and target.stat().st_size == o.size):
            continue
        sha = shas.get(o.key)
        if sha is None and isinstance(loc, S3Location):
            sha = _retry(partial(loc.head_sha256, o.key), attempts, f"read metadata of {loc.uri}/{o.key}", log)
        for attempt in range(2):
            _retry(partial(loc.download, o.key, target, o.size, o.etag, sha), attempts, f"download {loc.uri}/{o.key}",
                   log)
            problem = _verify(target, o, sha)
            if problem is None:
                break
            target.unlink(missing_ok=True)
            if attempt == 1:
                raise StorageFailed(f"{loc.uri}/{o.key}: downloaded file does not verify ({problem})")
            log(f"{o.key}: verification failed ({problem}); downloading again")
        state[o.key] = {"size": o.size, "etag": o.etag}
        state_file.write_text(json.dumps(state))
    return out


def list_objects(loc: Location, prefix: str = "", attempts: int = 4, log: Callable[[str], None] = print,
                 where: str | None = None) -> list:
    """Every object under ``loc`` (and ``prefix`` in it), retried as downloads are (BadConfig for an
    untrusted certificate). ``where``: the URI as the user wrote it, for the messages."""
    where = where or (f"{loc.uri.rstrip('/')}/{prefix}" if prefix else loc.uri)
    return _retry(lambda: list(loc.list(prefix)), attempts, f"cannot list {where}", log)


def _retry(fn, attempts: int, what: str, log, base_delay: float = 1.0):
    """``fn()`` with backoff (kubetune.api.storage.retry): a failure is the trainer's reason (storage_error),
    its own reasons pass at once, and an untrusted certificate is not retried."""
    return retry(fn, attempts, fail=lambda e: storage_error(what, e),
                 log_retry=lambda e, delay: log(f"{what} failed ({short_error(e)}); retrying in {delay:.0f}s"),
                 give_up=certificate_untrusted, passthrough=(StorageFailed, BadConfig), base_delay=base_delay)


def trust_ca_for_hub(work_dir: Path) -> Path | None:
    """spec.storage.caBundle (AWS_CA_BUNDLE) for the Hub too: a mirror signed by a private CA.
    huggingface_hub's client reads SSL_CERT_FILE, which replaces its trust store, so the file it gets
    holds the public roots and the private CA: huggingface.co and the mirror both verify. A
    SSL_CERT_FILE set in resources.env stands. Returns the bundle written, if any."""
    import ssl

    ca = os.environ.get("AWS_CA_BUNDLE")
    if not ca or os.environ.get("SSL_CERT_FILE"):
        return None
    roots = ssl.get_default_verify_paths().openssl_cafile
    if not os.path.isfile(roots):
        import certifi

        roots = certifi.where()
    out = work_dir / "ca-bundle.pem"
    tmp = out.with_name(f"{out.name}.{os.getpid()}")  # every local rank writes it: each its own, then a rename
    tmp.write_text(Path(roots).read_text() + "\n" + Path(ca).read_text())
    os.replace(tmp, out)
    os.environ["SSL_CERT_FILE"] = str(out)
    return out


def hub_error(uri: str, e: Exception, permanent: type, kind: str = "model") -> Exception:
    """What the Hugging Face Hub said, as the trainer's reason: ``permanent`` (ModelLoadFailed,
    BadData: the Job fails at once) when retrying cannot help, StorageFailed when it may (network,
    a 5xx: the Job retries the pod)."""
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    have_token = bool(os.environ.get("HF_TOKEN"))
    if isinstance(e, GatedRepoError):
        return permanent(f"{uri}: gated on the Hugging Face Hub, and " + (
            "the token in spec.model.tokenSecret has no access: accept the licence on the Hub with that account"
            if have_token
            else "no token was given: set spec.model.tokenSecret to a Secret holding an HF_TOKEN with access"))
    if isinstance(e, RevisionNotFoundError):
        return permanent(f"{uri}: the Hub has no such revision (the part after @)")
    if isinstance(e, RepositoryNotFoundError):
        return permanent(f"{uri}: no such {kind} on the Hugging Face Hub" + (
            "" if have_token
            else ", or it is private: set spec.model.tokenSecret to a Secret holding an HF_TOKEN with access"))
    if isinstance(e, (DisabledRepoError, HFValidationError)):
        return permanent(f"{uri}: {short_error(e)}")
    if certificate_untrusted(e):  # no retry fixes it
        hub = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        return BadConfig(f"{uri}: the Hub endpoint {hub} did not verify: {untrusted('its')}")
    return StorageFailed(f"{uri}: cannot download the {kind} from the Hugging Face Hub: {short_error(e)}")


def storage_error(what: str, e: BaseException) -> Exception:
    """The trainer's reason for an S3 failure: StorageFailed (the Job retries the pod), except a
    certificate that does not verify, which no retry fixes: BadConfig naming spec.storage.caBundle."""
    if certificate_untrusted(e):
        return BadConfig(f"{what}: {UNTRUSTED_S3}")
    return StorageFailed(f"{what}: {short_error(e)}")


def short_error(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]
