import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
pytest.importorskip("torch")
pytest.importorskip("peft")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tiny.build_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _termination_log(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A real S3 server process with the bucket kubetune; the env points boto3 at it."""
    from s3server import S3Server

    try:
        server = S3Server(tmp_path)
    except RuntimeError as e:
        pytest.skip(str(e))
    server.start()
    server.client().create_bucket(Bucket="kubetune")
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    yield server
    server.close()
