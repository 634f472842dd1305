"""The S3 server is a real process with on-disk storage: the calls boto3 makes work, and data survives
a restart of the server."""
from __future__ import annotations

import io
import os
import uuid

import pytest
import yaml

from kubetune.devenv import ground as g
from kubetune.devenv import procs

pytestmark = pytest.mark.integration


@pytest.fixture
def prefix() -> str:
    return f"it/{uuid.uuid4().hex[:8]}/"


def test_buckets_exist(ground):
    names = {b["Name"] for b in ground.s3().list_buckets()["Buckets"]}
    assert {"kubetune", "kubetune-models", "kubetune-data"} <= names


def test_env_configures_a_plain_boto3_client(ground, prefix):
    import boto3
    # The session fixture exported `kubetune dev env`: no endpoint or keys passed here.
    client = boto3.client("s3")
    client.put_object(Bucket="kubetune", Key=prefix + "env", Body=b"x")
    assert client.get_object(Bucket="kubetune", Key=prefix + "env")["Body"].read() == b"x"


def test_put_get_head_list_copy_delete(ground, prefix):
    s3 = ground.s3()
    for i in range(3):
        s3.put_object(Bucket="kubetune", Key=f"{prefix}dir/{i}.txt", Body=f"v{i}".encode())
    s3.put_object(Bucket="kubetune", Key=f"{prefix}top.txt", Body=b"top")
    assert s3.get_object(Bucket="kubetune", Key=f"{prefix}dir/1.txt")["Body"].read() == b"v1"
    assert s3.head_object(Bucket="kubetune", Key=f"{prefix}top.txt")["ContentLength"] == 3

    listed = s3.list_objects_v2(Bucket="kubetune", Prefix=prefix, Delimiter="/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [f"{prefix}top.txt"]
    assert [p["Prefix"] for p in listed.get("CommonPrefixes", [])] == [f"{prefix}dir/"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="kubetune", Prefix=prefix,
                                                         PaginationConfig={"PageSize": 2})
    assert sum(len(p.get("Contents", [])) for p in pages) == 4

    s3.copy_object(Bucket="kubetune-models", Key=f"{prefix}copy.txt",
                   CopySource={"Bucket": "kubetune", "Key": f"{prefix}top.txt"})
    assert s3.get_object(Bucket="kubetune-models", Key=f"{prefix}copy.txt")["Body"].read() == b"top"

    keys = [{"Key": f"{prefix}dir/{i}.txt"} for i in range(3)] + [{"Key": f"{prefix}top.txt"}]
    deleted = s3.delete_objects(Bucket="kubetune", Delete={"Objects": keys})
    assert len(deleted["Deleted"]) == 4
    assert s3.list_objects_v2(Bucket="kubetune", Prefix=prefix).get("KeyCount", 0) == 0


def test_multipart_upload_through_the_transfer_manager(ground, prefix):
    from boto3.s3.transfer import TransferConfig
    s3 = ground.s3()
    data = os.urandom(12 * 1024 * 1024 + 123)
    cfg = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)
    s3.upload_fileobj(io.BytesIO(data), "kubetune", prefix + "big.bin", Config=cfg)
    head = s3.head_object(Bucket="kubetune", Key=prefix + "big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3")     # 3 parts: a real multipart upload happened
    out = io.BytesIO()
    s3.download_fileobj("kubetune", prefix + "big.bin", out, Config=cfg)
    assert out.getvalue() == data


def test_an_aborted_multipart_upload_leaves_no_object(ground, prefix):
    s3 = ground.s3()
    up = s3.create_multipart_upload(Bucket="kubetune", Key=prefix + "aborted")
    s3.upload_part(Bucket="kubetune", Key=prefix + "aborted", UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 10)
    s3.abort_multipart_upload(Bucket="kubetune", Key=prefix + "aborted", UploadId=up["UploadId"])
    assert s3.list_objects_v2(Bucket="kubetune", Prefix=prefix).get("KeyCount", 0) == 0


def test_an_object_survives_an_s3_server_restart(ground, prefix):
    s3 = ground.s3()
    payload = os.urandom(64 * 1024)
    s3.put_object(Bucket="kubetune", Key=prefix + "ckpt/model.bin", Body=payload)
    old = procs.Proc.from_dict(ground.state["procs"]["s3"])

    new = g.restart("s3", ground.lay, log=lambda m: None)

    assert new.pid != old.pid and not procs.alive(old)
    s3 = ground.s3()   # a fresh client: no pooled connection to the old process
    assert s3.get_object(Bucket="kubetune", Key=prefix + "ckpt/model.bin")["Body"].read() == payload
    listed = s3.list_objects_v2(Bucket="kubetune", Prefix=prefix)["Contents"]
    assert [o["Key"] for o in listed] == [prefix + "ckpt/model.bin"]


def test_a_second_demo_clears_only_its_own_quickstarts_checkpoints(ground, prefix):
    """`make demo` run again deletes what the previous quickstart left (else the new FineTuneJob of the
    same name would find another object's checkpoints in its prefix), and nothing beside it: another
    job whose name starts the same, the same job in another namespace."""
    from kubetune.demo import REPO, clear_previous_run

    s3 = ground.s3()
    job = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    job["spec"]["checkpoints"]["uri"] = f"s3://kubetune/{prefix}"
    assert job["metadata"]["name"] == "quickstart"
    mine = [f"{prefix}demo-ns/quickstart/run-1/checkpoints/checkpoint-{s:08d}/state.pt" for s in (200, 250)]
    others = [f"{prefix}demo-ns/quickstart-2/run-1/x", f"{prefix}other-ns/quickstart/run-1/x"]
    for key in mine + others:
        s3.put_object(Bucket="kubetune", Key=key, Body=b"x")

    assert clear_previous_run(s3, job, "demo-ns") == 2
    left = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="kubetune", Prefix=prefix)["Contents"])
    assert left == sorted(others)
    assert clear_previous_run(s3, job, "demo-ns") == 0  # nothing left to clear: a first demo
