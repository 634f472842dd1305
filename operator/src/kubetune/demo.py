"""`make demo`: the main job, locally, end to end.

1. Bring up the test ground: a real control plane built from Go modules, a fake GPU fleet (KWOK)
   and an S3 server; install the CRDs.
2. Start the operator, and a local agent that runs trainer pods as real processes on this machine.
3. Put a tiny random-init Llama and an alpaca data set in S3.
4. `kubectl apply` examples/quickstart.yaml: the operator validates, estimates and places it, the
   trainer really fine-tunes it with LoRA on CPU, syncs checkpoints to S3 and reports progress; the
   FineTuneJob ends Succeeded with the base and tuned eval loss.
5. Memory-aware placement on the fake GPU fleet: lora-8b lands on the smallest GPU that fits,
   too-big is refused with fit advice.

The ground stays up afterwards (`kubetune dev down` stops it); the operator and agent stop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
NS = "kubetune-demo"


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


class Background:
    """The operator and the agent: started by the demo, stopped by it."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], env: dict, log: Path) -> None:
        p = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, p))
        print(f"started {name} (pid {p.pid}), log {log}", flush=True)

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                print(f"stopped {name}", flush=True)


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


def quickstart_for_local(endpoint: str) -> dict:
    """examples/quickstart.yaml, pointed at this ground's S3 and pinned to the local agent's node."""
    from kubetune.devenv.agent import LABEL, TAINT_KEY

    obj = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    obj["spec"]["storage"]["endpoint"] = endpoint
    r = obj["spec"]["resources"]
    r["nodeSelector"] = {LABEL: "true"}
    r["tolerations"] = [{"key": TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    return obj


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

    say("1. The test ground: control plane from Go modules, fake GPU fleet, S3 (the first run builds, ~20 min)")
    lay = g.layout()
    g.up(lay)
    env = {**os.environ, **g.env_values(lay)}
    env["PATH"] = os.pathsep.join([*g.path_dirs(lay), env.get("PATH", "")])
    state = g.up_state(lay)
    kubectl = [str(Path(state["bin"]["kubernetes"]) / "kubectl")]
    run(kubectl + ["apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds")], env=env)
    run(kubectl + ["wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s"], env=env)
    run(kubectl + ["get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.memory,nvidia.com/gpu.count"], env=env)

    bg = Background()
    try:
        say("2. The operator, and a local agent that runs trainer pods as processes on this machine")
        bg.start(
            "operator",
            [
                sys.executable,
                "-m",
                "kubetune.cli",
                "operator",
                "--standalone",
                "--metrics-port",
                "0",
                "--liveness",
                "",
                "--progress-interval",
                "3",
                # the ground's S3 server listens on this machine's loopback
                "--allow-endpoint",
                "127.0.0.1",
            ],
            env,
            lay.root / "demo-operator.log",
        )
        bg.start(
            "agent",
            [sys.executable, "-m", "kubetune.devenv.agent", "--node", "local-0", "--cpu", "2"],
            env,
            lay.root / "demo-agent.log",
        )
        g.wait_until(
            "the local node",
            lambda: run(kubectl + ["get", "node", "local-0"], env=env, check=False, quiet=True).returncode == 0,
            60,
        )

        say("3. A tiny random-init Llama and alpaca data in S3 (no hub downloads)")
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
        # The meta-llama examples of step 5 name a Hub token Secret (the models are gated). Their
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

        say("4. kubectl apply -f examples/quickstart.yaml (LoRA on CPU, for real)")
        run(kubectl + ["apply", "-n", NS, "-f", "-"], env=env, stdin=json.dumps(quickstart_for_local(s3["endpoint"])))
        done = watch(kubectl, env, "quickstart")
        st = done["status"]
        for c in st.get("conditions", []):
            print(f"  {c['type']:<17} {c['status']:<6} {c['reason']:<22} {c['message'][:110]}")
        if st.get("phase") != "Succeeded":
            print((lay.root / "demo-agent.log").read_text()[-3000:])
            raise SystemExit("demo: the quickstart run failed (agent log above)")
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

        say("4b. kubetune report quickstart: the base and the tuned model's answers, side by side")
        run([sys.executable, "-m", "kubetune.cli", "report", "quickstart", "-n", NS, "--width", "100"], env=env)

        say("5. Memory-aware placement on the fake GPU fleet (KWOK plays the kubelet)")
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
        run(kubectl + ["delete", "ftj", "lora-8b", "too-big", "-n", NS, "--wait=false"], env=env, quiet=True)
    finally:
        bg.stop()
    print('\nThe ground is still up: `eval "$(kubetune dev env)"` to use kubectl, `kubetune dev down` to stop it.')
    return 0


if __name__ == "__main__":
    sys.exit(main())
