"""`make demo`: the main job, locally, as far as it is built.

Each step says what it shows. Steps whose component has not landed yet say so instead of
pretending: the demo grows with the project.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def say(title: str) -> None:
    print(f"\n\033[1m==> {title}\033[0m", flush=True)


def kubetune(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print("$ kubetune " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "kubetune.cli", *args], check=check)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def main() -> int:
    say("1. The FineTuneJob API: every example validates against the pydantic models")
    kubetune("validate", *[str(p.relative_to(REPO)) for p in EXAMPLES])

    say("2. Bad input is rejected with messages that name the field")
    bad = (REPO / "examples/lora-8b.yaml").read_text().replace("rank: 16", "rank: 0").replace(
        "epochs: 3", "epochs: 3\n    maxSteps: 100"
    )
    print("$ kubetune validate -   # lora-8b.yaml with rank: 0 and both epochs and maxSteps", flush=True)
    subprocess.run([sys.executable, "-m", "kubetune.cli", "validate", "-"], input=bad, text=True)

    say("3. The CRD is generated from the same models")
    from kubetune.api.crd import crd

    c = crd()
    v = c["spec"]["versions"][0]
    rules = str(v["schema"]).count("'rule'")
    print(f"{c['metadata']['name']}: {v['name']}, {len(v['additionalPrinterColumns'])} printer columns, "
          f"{rules} CEL rules; `kubetune crd` prints it (crds/ holds the same)")

    if have("kubetune.estimator.cli"):
        say("4. GPU memory estimates for the examples")
        for name in ("lora-8b", "qlora-8b", "full-1b", "too-big"):
            kubetune("estimate", "-f", f"examples/{name}.yaml", check=False)
    else:
        say("4. GPU memory estimates: the estimator has not landed yet")

    if have("kubetune.devenv.cli"):
        say("5. The local test ground: a real control plane, fake GPU fleet and S3 (first run builds from source)")
        kubetune("dev", "up")
        kubetune("dev", "status", check=False)
        env = _ground_env()
        kubectl = [env.get("KUBETUNE_KUBECTL", "kubectl")]
        subprocess.run(kubectl + ["apply", "-f", str(REPO / "crds")], env=env, check=True)
        subprocess.run(kubectl + ["get", "nodes", "-L", "nvidia.com/gpu.product,nvidia.com/gpu.memory"], env=env)
        subprocess.run(kubectl + ["explain", "finetunejob.spec.method"], env=env)
        print("\nThe ground stays up: `eval \"$(kubetune dev env)\"` to use kubectl; `kubetune dev down` stops it.")
    else:
        say("5. The local test ground has not landed yet")

    say("Not built yet")
    for module, what in (
        ("kubetune.controller", "the operator (placement, Jobs, status, metrics)"),
        ("kubetune_trainer.loop", "the trainer run end to end from the operator"),
    ):
        if not have(module):
            print(f"- {what}")
    print("- the Helm chart, Grafana dashboard and the end-to-end quickstart run")
    return 0


def _ground_env() -> dict[str, str]:
    import os
    import shlex

    out = subprocess.run([sys.executable, "-m", "kubetune.cli", "dev", "env"], capture_output=True, text=True, check=True)
    env = dict(os.environ)
    for line in out.stdout.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            value = " ".join(shlex.split(value.replace('"$PATH"', env.get("PATH", ""))))
            env[key] = value
    return env


if __name__ == "__main__":
    sys.exit(main())
