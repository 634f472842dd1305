"""The images as built from their Dockerfiles (buildah, no daemon), run in a container: what users get.

`make images` keeps the layers cached, so once the dependency layer exists (per constraints.txt) a rebuild
here is the code layers only. Each container runs as the image's own user, with a host directory as the
Job's /tmp emptyDir (root-owned, 1777, as a kubelet makes it)."""
from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune.devenv import images

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]  # tests/images/: not tests/integration, whose tests share one worker


@pytest.fixture(scope="module")
def built() -> dict[str, str]:
    return images.build(list(images.IMAGES), REPO)


def _run(image: str, script: str, tmp: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `sh -c script` in a fresh container of `image` as its USER, with `tmp` mounted at /tmp."""
    ctr = subprocess.run(images.buildah_argv("from", "--pull=never", "-q", image), capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        vol = ["-v", f"{tmp}:/tmp"] if tmp else []
        return subprocess.run(images.buildah_argv("run", "--isolation", "chroot", *vol, ctr, "--", "sh", "-c", script),
                              capture_output=True, text=True, timeout=timeout)
    finally:
        subprocess.run(images.buildah_argv("rm", ctr), capture_output=True)


@pytest.fixture
def empty_dir(tmp_path) -> Iterator[Path]:
    d = tmp_path / "emptydir"
    d.mkdir(mode=0o777)
    d.chmod(0o1777)  # what an emptyDir is: root-owned, world-writable
    yield d


def test_the_operator_image_runs_as_its_non_root_user_without_torch(built):
    r = _run(images.IMAGES["operator"].ref(),
             "id -u; python -c \"import kubetune.cli, sys; print('torch' in sys.modules)\"; kubetune operator --help")
    assert r.returncode == 0, r.stderr[-2000:]
    uid, torch_loaded, *helptext = r.stdout.splitlines()
    assert (uid, torch_loaded) == ("65532", "False")
    assert any("--standalone" in line for line in helptext)


def test_the_trainer_image_trains_on_cpu_as_uid_1000_with_tmp_an_empty_dir(built, empty_dir):
    """No driver here: torch sees no CUDA, there is no nvidia-smi, and the trainer falls back to CPU. It
    trains a tiny model end to end as the image's user, writing only under the /tmp volume."""
    script = textwrap.dedent("""\
        set -e
        echo "uid=$(id -u) cwd=$(pwd)"
        if command -v nvidia-smi; then echo nvidia-smi-present; fi
        command -v gcc >/dev/null && echo gcc-present
        python - <<'EOF'
        import json, torch, yaml
        from pathlib import Path
        from kubetune_trainer import tiny
        print("cuda", torch.cuda.is_available())
        root = Path("/tmp/kubetune")
        model = tiny.build_model_dir(root / "tiny-model")
        data = tiny.write_jsonl(root / "train.jsonl", tiny.alpaca_rows(64))
        cfg = {"apiVersion": "kubetune.io/v1alpha1", "kind": "TrainerConfig",
               "job": {"namespace": "default", "name": "image", "run": 1},
               "spec": {"model": {"uri": f"file://{model}"}, "dataset": {"uri": f"file://{data}", "maxSeqLength": 64},
                        "method": {"type": "lora", "lora": {"rank": 4, "alpha": 8}},
                        "training": {"maxSteps": 6, "microBatchSize": 4, "learningRate": 3e-3, "loggingSteps": 1,
                                     "precision": "fp32", "seed": 7},
                        "resources": {"gpusPerNode": 0}, "checkpoints": {"uri": "s3://unused/", "saveSteps": 3}},
               "resolved": {"microBatchSize": 4, "gradientAccumulationSteps": 1, "numProcesses": 1},
               "paths": {"checkpointsUri": "file:///tmp/kubetune/store/ckpt", "outputUri": "file:///tmp/kubetune/store/out",
                         "progressUri": "file:///tmp/kubetune/store/progress.json", "workDir": "/tmp/kubetune/work"},
               "metricsPort": 0}
        (root / "trainer.yaml").write_text(yaml.safe_dump(cfg))
        EOF
        export KUBETUNE_TERMINATION_LOG=/tmp/kubetune/termination
        kubetune train --config /tmp/kubetune/trainer.yaml > /tmp/kubetune/events.jsonl
        echo "train-exit=$?"
        """)
    r = _run(images.IMAGES["trainer"].ref(), script, empty_dir)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = r.stdout.splitlines()
    assert "uid=1000 cwd=/home/kubetune" in out
    assert "nvidia-smi-present" not in out and "gcc-present" in out
    assert "cuda False" in out and "train-exit=0" in out
    events = [json.loads(line) for line in (empty_dir / "kubetune/events.jsonl").read_text().splitlines()
              if line.startswith("{")]
    steps = [e for e in events if e.get("event") == "step"]
    assert len(steps) == 6 and steps[-1]["loss"] < steps[0]["loss"], steps
    assert [e for e in events if e.get("event") == "finished"]
    termination = json.loads((empty_dir / "kubetune/termination").read_text())
    assert termination["reason"] == "Completed", termination
    assert (empty_dir / "kubetune/store/out/adapter/adapter_model.safetensors").is_file()
    # everything written is the image user's: nothing needed root
    owners = {p.stat().st_uid for p in (empty_dir / "kubetune").rglob("*")}
    assert owners == {1000}, owners


def test_a_working_container_left_by_a_killed_build_is_found_by_its_age(built):
    """What a build killed mid-step leaves: a working container with its overlay mounted. The next
    build's prune finds it in the storage's containers.json by its creation time (it removes those
    older than IN_USE_GRACE; removing it here would race a test beside this one)."""
    ctr_id = subprocess.run(images.buildah_argv("from", "--pull=never", "-q", images.IMAGES["operator"].ref()),
                            capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(images.buildah_argv("mount", ctr_id), capture_output=True, check=True)
        ids = {r["id"]: r for r in images.working_containers()}
        full = next((i for i in ids if i.startswith(ctr_id) or ids[i].get("names") == [ctr_id]), None)
        assert full is not None, f"{ctr_id} not in containers.json: {list(ids)}"
        now = time.time()
        assert full not in images.stale_containers(list(ids.values()), now, images.IN_USE_GRACE)
        assert full in images.stale_containers(list(ids.values()), now + images.IN_USE_GRACE + 5, images.IN_USE_GRACE)
    finally:
        subprocess.run(images.buildah_argv("rm", ctr_id), capture_output=True)
