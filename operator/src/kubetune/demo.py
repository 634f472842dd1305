"""`make demo`: the main job, locally, end to end.

1. Bring up the test ground: a real control plane built from Go modules, a fake GPU fleet (KWOK),
   an S3 server and one real kubelet node (real-0: containerd, runc); install the CRDs.
2. Build (or reuse) the operator and trainer images and import them into real-0's containerd.
3. `helm install` charts/kubetune: the operator runs as a pod on real-0, under the chart's
   ServiceAccount and RBAC, in a namespace that enforces the restricted Pod Security Standard.
4. Put a tiny random-init Llama and an alpaca data set in S3.
5. `kubectl apply` examples/quickstart.yaml: the operator validates, estimates and places it; the
   trainer pod runs in the trainer image on real-0, fine-tunes with LoRA on CPU, syncs checkpoints
   to S3 and reports progress; the FineTuneJob ends Succeeded with the base and tuned eval loss.
6. Memory-aware placement on the fake GPU fleet: lora-8b lands on the smallest GPU that fits,
   too-big is refused with fit advice.

The ground stays up afterwards (`kubetune dev down` stops it); the release is uninstalled, so the
integration tests' own operators on a reused ground have no rival.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
NS = "kubetune-demo"
OPERATOR_NS = "kubetune-system"
RELEASE = "kubetune"


def say(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def run(
    cmd: list[str], env: dict | None = None, check: bool = True, stdin: str | None = None, quiet: bool = False
) -> subprocess.CompletedProcess:
    if not quiet:
        print("$ " + " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
    r = subprocess.run(cmd, env=env, input=stdin, text=True, capture_output=quiet)
    if check and r.returncode != 0:
        raise SystemExit(f"demo: `{' '.join(cmd)}` failed ({r.returncode})\n{r.stderr or ''}")
    return r


def upload_tiny_model_and_data(s3) -> None:
    from kubetune_trainer.tiny import alpaca_rows, build_model_dir

    with tempfile.TemporaryDirectory() as d:
        model = build_model_dir(Path(d) / "tiny-llama")
        for f in sorted(model.iterdir()):
            s3.upload_file(str(f), "kubetune-models", f"tiny-llama/{f.name}")
        print(f"s3://kubetune-models/tiny-llama/: {', '.join(sorted(p.name for p in model.iterdir()))}")
    rows = alpaca_rows(400, seed=1)
    s3.put_object(
        Bucket="kubetune-data", Key="quickstart/train.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode()
    )
    print(f"s3://kubetune-data/quickstart/train.jsonl: {len(rows)} alpaca examples, e.g. {json.dumps(rows[0])}")


def clear_previous_run(s3, job: dict, namespace: str) -> int:
    """Delete what an earlier demo's quickstart left in S3; returns how many objects. A FineTuneJob made
    again under the same name writes to the same <checkpoints.uri>/<namespace>/<name>/run-1/, where its
    predecessor's checkpoints stay (deletionPolicy Retain, the default), and the trainer refuses to
    continue another object's run unasked (docs/operator.md). The demo owns this namespace."""
    from kubetune.api.storage import split_s3_uri
    from kubetune.api.validation import parse_spec
    from kubetune.controller import manifests, sources

    prefix = manifests.job_prefix(parse_spec(job["spec"]), namespace, job["metadata"]["name"])
    return sources.delete_under(s3, *split_s3_uri(prefix))


def quickstart_for_node(endpoint: str, node_name: str) -> dict:
    """examples/quickstart.yaml, pointed at S3 as pods reach it and pinned to a real node (its taint
    keeps every other pod off it)."""
    from kubetune.devenv.node import TAINT_KEY

    obj = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    obj["spec"]["storage"]["endpoint"] = endpoint
    r = obj["spec"]["resources"]
    r["nodeSelector"] = {"kubernetes.io/hostname": node_name}
    r["tolerations"] = [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    return obj


def chart_values(
    node_name: str, replicas: int = 1, progress_interval: int = 3, trainer_env: dict | None = None
) -> dict:
    """Helm values that run the chart's operator on a real node of the ground: it tolerates the node's
    taint and is pinned there (KWOK would "run" it elsewhere, doing nothing). The images come from
    the node's containerd (imported, no registry), hence IfNotPresent."""
    from kubetune.devenv.node import TAINT_KEY

    return {
        "replicaCount": replicas,
        "image": {"pullPolicy": "IfNotPresent"},
        "nodeSelector": {"kubernetes.io/hostname": node_name},
        "tolerations": [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
        "operator": {"progressInterval": progress_interval},
        "trainer": {"env": trainer_env or {}},
    }


def timed(what: str, fn, *args, every: float = 30):
    """Run one long step, saying what it is first, that it still runs every `every` seconds (a cold
    trainer build or export is minutes of silence otherwise), and how long it took after."""
    print(f"  {what} ...", flush=True)
    t0 = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every):
            print(f"  ... {what}: {time.monotonic() - t0:.0f} s so far", flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        out = fn(*args)
    finally:
        done.set()
    print(f"  {what}: {time.monotonic() - t0:.0f} s", flush=True)
    return out


def watch(kubectl: list[str], env: dict, name: str, timeout: float = 900) -> dict:
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        row = run(kubectl + ["get", "ftj", name, "-n", NS, "--no-headers"], env=env, quiet=True).stdout.strip()
        if row != last:
            print(f"  [{time.time() - t0:5.0f}s] {row}", flush=True)
            last = row
        obj = json.loads(run(kubectl + ["get", "ftj", name, "-n", NS, "-o", "json"], env=env, quiet=True).stdout)
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return obj
        time.sleep(2)
    raise SystemExit(f"demo: {name} did not finish in {timeout:.0f}s")


def main() -> int:
    from kubetune.devenv import ground as g
    from kubetune.devenv import images

    t_start = time.monotonic()
    say(
        "1. The test ground: control plane from Go modules, fake GPU fleet, S3, a real node "
        "(a first run builds it: ~11 min on 2 cores)"
    )
    lay = g.layout()
    # The images build (downloads, disk) while a fresh machine compiles the ground (CPU): step 2 waits for
    # it. Warm, both are cache hits. Its lines start "  [images]".
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="images")
    built = pool.submit(images.build, ["operator", "trainer"], REPO, lambda m: print(f"  [images] {m}", flush=True))
    pool.shutdown(wait=False)
    timed("ground up", g.up, lay)
    env = {**os.environ, **g.env_values(lay)}
    env["PATH"] = os.pathsep.join([*g.path_dirs(lay), env.get("PATH", "")])
    state = g.up_state(lay)
    nodes = (state.get("real_nodes") or {}).get("nodes") or []
    if not nodes:
        raise SystemExit(
            "demo: the ground has no real node (they need root): as root, `kubetune dev down` then `make demo`"
        )
    node = nodes[0]
    kubectl = [str(Path(state["bin"]["kubernetes"]) / "kubectl")]
    run(kubectl + ["apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds")], env=env)
    run(kubectl + ["wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"], env=env)
    run(kubectl + ["get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.memory,nvidia.com/gpu.count"], env=env)

    say(
        f"2. The operator and trainer images (buildah, cached layers; a first build ~3 min, begun in step 1), "
        f"into {node['name']}"
    )
    timed("image builds (begun beside the ground's)", built.result)
    for name in ("operator", "trainer"):
        # a no-op when the node's containerd holds this very build (same manifest digest)
        timed(f"{name} image into {node['name']}'s containerd", images.import_into, node, name)

    say(f"3. helm install {RELEASE} charts/kubetune: the operator as a pod on {node['name']} (restricted Pod Security)")
    run(kubectl + ["create", "namespace", OPERATOR_NS], env=env, check=False, quiet=True)
    run(
        kubectl + ["label", "--overwrite", "namespace", OPERATOR_NS, "pod-security.kubernetes.io/enforce=restricted"],
        env=env,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="demo-values-") as vf:
        # a mark on the trainer pods this release's operator makes (--trainer-env), checked in step 5
        json.dump(chart_values(node["name"], trainer_env={"DEMO_RELEASE": f"{OPERATOR_NS}/{RELEASE}"}), vf)
        vf.flush()
        timed(
            "helm install (until the operator pod is ready)",
            run,
            [
                "helm",
                "upgrade",
                "--install",
                RELEASE,
                str(REPO / "charts" / "kubetune"),
                "-n",
                OPERATOR_NS,
                "-f",
                vf.name,
                "--wait",
                "--timeout",
                "180s",
            ],
            env,
        )
    run(kubectl + ["get", "pods", "-n", OPERATOR_NS, "-o", "wide"], env=env)
    (op_pod,) = json.loads(
        run(
            kubectl + ["get", "pods", "-n", OPERATOR_NS, "-l", "app.kubernetes.io/name=kubetune", "-o", "json"],
            env=env,
            quiet=True,
        ).stdout
    )["items"]
    psc = op_pod["spec"].get("securityContext") or {}
    print(
        f"  {op_pod['metadata']['name']}: serviceAccount {op_pod['spec']['serviceAccountName']}, runAsNonRoot "
        f"{psc.get('runAsNonRoot')}, uid {psc.get('runAsUser')}, "
        f"{op_pod['status']['containerStatuses'][0]['containerID'][:25]}..."
    )

    # Ready is only the liveness port; the peering record is kopf running, watching, able to act.
    g.wait_until(
        f"{op_pod['metadata']['name']} in the ClusterKopfPeering {RELEASE}",
        lambda: (
            op_pod["metadata"]["name"]
            in (
                json.loads(
                    run(kubectl + ["get", "clusterkopfpeering", RELEASE, "-o", "json"], env=env, quiet=True).stdout
                ).get("status")
                or {}
            )
        ),
        90,
    )
    print(f"  {op_pod['metadata']['name']} is the peering's one peer: it acts", flush=True)

    try:
        say("4. A tiny random-init Llama and alpaca data in S3 (no hub downloads)")
        upload_tiny_model_and_data(g.s3_client(state))
        run(kubectl + ["create", "namespace", NS], env=env, check=False, quiet=True)
        s3 = state["s3"]
        secret = run(
            kubectl
            + [
                "create",
                "secret",
                "generic",
                "kubetune-s3",
                "-n",
                NS,
                "--dry-run=client",
                "-o",
                "yaml",
                f"--from-literal=AWS_ACCESS_KEY_ID={s3['access_key']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={s3['secret_key']}",
            ],
            env=env,
            quiet=True,
        ).stdout
        run(kubectl + ["apply", "-f", "-"], env=env, stdin=secret, quiet=True)
        # The meta-llama examples of step 6 name a Hub token Secret (the models are gated). Their
        # architectures come from kubetune's catalog and KWOK plays their pods, so nothing reads the
        # Hub here: a placeholder token does.
        token = run(
            kubectl
            + [
                "create",
                "secret",
                "generic",
                "hf-token",
                "-n",
                NS,
                "--dry-run=client",
                "-o",
                "yaml",
                "--from-literal=HF_TOKEN=hf_placeholder",
            ],
            env=env,
            quiet=True,
        ).stdout
        run(kubectl + ["apply", "-f", "-"], env=env, stdin=token, quiet=True)
        run(kubectl + ["delete", "ftj", "--all", "-n", NS, "--wait=true"], env=env, check=False, quiet=True)

        say(f"5. kubectl apply -f examples/quickstart.yaml (LoRA on CPU, in the trainer image on {node['name']})")
        # S3 as pods reach it: the ground's bridge gateway, DNATed to the S3 server
        endpoint = state["real_nodes"]["pod_endpoints"]["s3"]
        quickstart = quickstart_for_node(endpoint, node["name"])
        if cleared := clear_previous_run(g.s3_client(state), quickstart, NS):
            print(f"  removed {cleared} objects an earlier demo's quickstart left in S3 (a new one starts over)")
        run(kubectl + ["apply", "-n", NS, "-f", "-"], env=env, stdin=json.dumps(quickstart))
        t0 = time.monotonic()
        done = watch(kubectl, env, "quickstart")
        print(f"  trained in {time.monotonic() - t0:.0f} s", flush=True)
        st = done["status"]
        for c in st.get("conditions", []):
            print(f"  {c['type']:<17} {c['status']:<6} {c['reason']:<22} {c['message'][:110]}")
        run(kubectl + ["get", "pods", "-n", NS, "-l", "kubetune.io/job=quickstart", "-o", "wide"], env=env)
        pods = json.loads(
            run(
                kubectl + ["get", "pods", "-n", NS, "-l", "kubetune.io/job=quickstart", "-o", "json"],
                env=env,
                quiet=True,
            ).stdout
        )["items"]
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                print(
                    f"  {pod['metadata']['name']} on {pod['spec'].get('nodeName')}: {cs['image']}, "
                    f"{cs.get('containerID')}"
                )
            mark = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env") or []}
            if mark.get("DEMO_RELEASE") == f"{OPERATOR_NS}/{RELEASE}":
                print(f"  made by the chart's operator (its trainer env DEMO_RELEASE={OPERATOR_NS}/{RELEASE})")
            else:
                # a cluster-wide operator outside the release (say, a test session's) got there first
                print("  warning: another operator on this ground made this pod, not the release's")
        run(kubectl + ["get", "pods", "-n", OPERATOR_NS, "-o", "wide"], env=env)
        if st.get("phase") != "Succeeded":
            run(kubectl + ["logs", "-n", OPERATOR_NS, f"deployment/{RELEASE}", "--tail=60"], env=env, check=False)
            for pod in pods:
                run(kubectl + ["logs", "-n", NS, pod["metadata"]["name"], "--tail=40"], env=env, check=False)
            raise SystemExit("demo: the quickstart run failed (operator and trainer logs above)")
        m = (st.get("result") or {}).get("metrics", {})
        print(
            f"\n  eval loss: base model {m.get('baseEvalLoss', float('nan')):.3f} -> tuned "
            f"{m.get('evalLoss', float('nan')):.3f} (perplexity {m.get('basePerplexity', float('nan')):.1f} -> "
            f"{m.get('perplexity', float('nan')):.1f})"
        )
        print(f"  adapter: {st['result'].get('adapterUri')}")
        print(f"  checkpoints: {(st.get('checkpoints') or {}).get('latestUri')}")
        ev = st["result"].get("evaluation")
        if not ev or not st["result"].get("reportUri"):
            raise SystemExit("demo: the quickstart's result has no evaluation (status.result.evaluation)")
        print(f"\n  test set ({ev.get('examples')} examples): {ev.get('headline')}")
        for metric in ("loss", "tokenAccuracy", "exactMatch", "rougeL"):
            b, t = ev["base"].get(metric), ev["tuned"].get(metric)
            if b is not None and t is not None:
                print(f"    {metric:<14} base {b:8.3f}  tuned {t:8.3f}")

        say("5b. kubetune report quickstart: the base and the tuned model's answers, side by side")
        run([sys.executable, "-m", "kubetune.cli", "report", "quickstart", "-n", NS, "--width", "100"], env=env)

        say("6. Memory-aware placement on the fake GPU fleet (KWOK plays the kubelet)")
        for name in ("lora-8b", "too-big"):
            obj = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
            obj["spec"]["resources"]["podAnnotations"] = {"pod-complete.stage.kwok.x-k8s.io/delay": "120s"}
            run(kubectl + ["apply", "-n", NS, "-f", "-"], env=env, stdin=json.dumps(obj))
        g.wait_until(
            "placement decided",
            lambda: all(
                json.loads(run(kubectl + ["get", "ftj", n, "-n", NS, "-o", "json"], env=env, quiet=True).stdout)
                .get("status", {})
                .get("phase")
                in ("Running", "Unschedulable")
                for n in ("lora-8b", "too-big")
            ),
            60,
        )
        run(kubectl + ["get", "ftj", "-n", NS], env=env)
        big = json.loads(run(kubectl + ["get", "ftj", "too-big", "-n", NS, "-o", "json"], env=env, quiet=True).stdout)
        sched = next(c for c in big["status"]["conditions"] if c["type"] == "Scheduled")
        print(f"\n  too-big: Scheduled={sched['status']} reason {sched['reason']}:\n  {sched['message']}")
        # waited for: their finalizers need the operator, which goes with the release below
        run(
            kubectl + ["delete", "ftj", "lora-8b", "too-big", "-n", NS, "--timeout=60s"],
            env=env,
            quiet=True,
            check=False,
        )
    finally:
        # A release left running would reconcile every namespace beside the integration tests' own
        # operators on a reused ground.
        run(["helm", "uninstall", RELEASE, "-n", OPERATOR_NS, "--wait", "--timeout", "60s"], env=env, check=False)
    print(f"\ndemo done in {time.monotonic() - t_start:.0f} s.")
    print(
        '\nThe ground is still up: `eval "$(kubetune dev env)"` to use kubectl, `kubetune dev down` to stop it;\n'
        f"`helm install {RELEASE} charts/kubetune -n {OPERATOR_NS} -f <values>` brings the operator back "
        "(the demo's values: kubetune.demo.chart_values)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
