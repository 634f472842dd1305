"""Bring the test ground up and down: etcd -> kube-apiserver -> kube-controller-manager -> kube-scheduler
-> kwok, then the fake GPU fleet, an S3 server, real kubelet nodes (devenv/node.py) and (on request)
Prometheus. Real processes on free loopback ports; their pids, ports and commands are recorded in
<dev dir>/state.json so `down`, `status`, `env` and `restart` act on exactly what `up` started.

Cluster state (etcd, certificates, tokens) is made fresh by every `up`; the S3 data directory is kept, so
objects survive a restart of the S3 server and a down/up of the ground.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kubetune.devenv import fleet, node, paths, procs, render

S3_BUCKETS = ("kubetune", "kubetune-models", "kubetune-data")
S3_REGION = "us-east-1"
# Start order; `down` goes backwards. A real node's processes are named containerd/<node>, kubelet/<node>.
ORDER = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "s3",
    "coredns",
    "containerd",
    "kubelet",
    "prometheus",
)
# The user the apiserver is when it calls a kubelet (logs, exec), by its client certificate.
KUBELET_CLIENT_USER = "kube-apiserver-kubelet-client"
CONTROLLERS = (
    "job-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "ttl-after-finished-controller",
    "deployment-controller",
    "replicaset-controller",
    "pod-garbage-collector-controller",
    "root-ca-certificate-publisher-controller",
    # The TaintNodesByCondition admission plugin gives every new node a not-ready:NoSchedule taint that
    # only this controller lifts once the node reports Ready. It also taints nodes whose KWOK lease
    # lapses, and the taint-eviction controller then evicts their pods, as on a real cluster.
    "node-lifecycle-controller",
    "taint-eviction-controller",
    # Fills the built-in aggregated roles (view, edit, admin); without it `view` grants nothing.
    "clusterrole-aggregation-controller",
    # Binds PersistentVolumeClaims to volumes: a pod reading a pvc:// model or dataset needs it bound.
    "persistentvolume-binder-controller",
    # EndpointSlices for Services, with each pod's hostname: CoreDNS answers a headless Service's
    # <hostname>.<service>.<ns>.svc.cluster.local from them (trainer rendezvous on real nodes).
    "endpointslice-controller",
)
SERVICE_CIDR = "10.0.0.0/24"
# Loopback for the host's clients; the `kubernetes` Service's address and names for in-cluster clients.
APISERVER_SANS = (
    "IP:127.0.0.1",
    f"IP:{node.KUBERNETES_VIP}",
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    f"DNS:kubernetes.default.svc.{node.CLUSTER_DOMAIN}",
)
POD_CIDR = "10.244.0.0/16"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class GroundError(RuntimeError):
    """The ground could not be brought up or acted on; the message says which process and shows its log."""


# --- layout and state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    def __getattr__(self, name: str) -> Path:  # only for the names below; keeps paths in one table
        try:
            return self.root / _LAYOUT[name]
        except KeyError:
            raise AttributeError(name) from None


_LAYOUT = {
    "state": "state.json",
    "kubeconfig": "kubeconfig",
    "logs": "logs",
    "pki": "pki",
    "apiserver_cert": "pki/apiserver",
    "ca_crt": "pki/ca.crt",
    "ca_key": "pki/ca.key",
    "kubelet_client": "pki/apiserver-kubelet-client",
    "sa_key": "pki/sa.key",
    "tokens_csv": "pki/tokens.csv",
    "admin_token": "admin.token",
    "dev_token": "dev-user.token",
    "etcd": "etcd",
    "scheduler_cfg": "scheduler.yaml",
    "kwok_cfg": "kwok.yaml",
    "s3": "s3",
    "s3_data": "s3/data",
    "s3_creds": "s3/credentials.json",
    "prom": "prometheus",
    "prom_cfg": "prometheus/prometheus.yml",
    "prom_targets": "prometheus/targets.json",
    "prom_data": "prometheus/data",
}


def layout(root: Path | None = None) -> Layout:
    return Layout(Path(root) if root else paths.dev_dir())


def rank(name: str) -> int:
    """Position of a process in the start order (containerd/real-0 ranks as containerd)."""
    return ORDER.index(name.split("/")[0])


def default_real_nodes() -> int:
    """One real node when root (it needs cgroups, a bridge and mounts), none otherwise."""
    return 1 if os.geteuid() == 0 else 0


def load_state(lay: Layout) -> dict | None:
    try:
        return json.loads(lay.state.read_text())
    except FileNotFoundError:
        return None


def up_state(lay: Layout) -> dict:
    """The state of a ground that is up (or has just been started): none is an error here, not None."""
    state = load_state(lay)
    if state is None:
        raise GroundError(f"no ground state in {lay.root}: run `kubetune dev up` first")
    return state


def save_state(lay: Layout, state: dict) -> None:
    tmp = lay.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(lay.state)


def recorded(state: dict | None) -> dict[str, procs.Proc]:
    if not state:
        return {}
    return {n: procs.Proc.from_dict(d) for n, d in state.get("procs", {}).items()}


# --- readiness ----------------------------------------------------------------------------------------


def _http_get(url: str, token: str | None = None, ca: Path | None = None, timeout: float = 2.0) -> str | None:
    """Body of a 200 answer, else None. Without a CA the TLS check is skipped: the components' own
    self-signed serving certs are on loopback and are only probed for health."""
    ctx = None
    if url.startswith("https"):
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.read().decode() if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return None


def _wait_ready(proc: procs.Proc, check: Callable[[], bool], timeout: float) -> None:
    """Wait for a process's readiness check; fail early, with its log, if it dies meanwhile."""

    def probe() -> bool:
        if check():
            return True
        if not procs.alive(proc):
            raise GroundError(f"{proc.name} exited during start-up; log {proc.log}:\n{procs.log_tail(proc.log)}")
        return False

    try:
        wait_until(f"{proc.name} to be ready", probe, timeout, 0.2)
    except GroundError as e:
        if procs.alive(proc):
            raise GroundError(f"{e}; log {proc.log}:\n{procs.log_tail(proc.log)}") from None
        raise


def wait_until(what: str, check: Callable[[], object], timeout: float = 60, interval: float = 0.5):
    """Poll check() until it returns something truthy and return that; GroundError after timeout.
    Public for the integration tests, which wait on the cluster the same way."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise GroundError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def _ready_check(name: str, lay: Layout, state: dict) -> Callable[[], bool]:
    ports, admin = state["ports"], state.get("admin_token", "")
    if "/" in name:
        kind, plan = name.split("/")[0], _plan(state, name)
        if kind == "containerd":
            return lambda: _http_get(f"http://127.0.0.1:{plan.metrics_port}/v1/metrics") is not None
        return lambda: _http_get(f"http://127.0.0.1:{plan.healthz_port}/healthz") == "ok"
    if name == "coredns":
        ready = state["real_nodes"]["dns"]["ready_port"]
        return lambda: _http_get(f"http://127.0.0.1:{ready}/ready") is not None
    checks: dict[str, Callable[[], bool]] = {
        "etcd": lambda: '"health":"true"' in (_http_get(f"http://127.0.0.1:{ports['etcd']}/health") or ""),
        "kube-apiserver": lambda: _http_get(f"https://127.0.0.1:{ports['apiserver']}/readyz", admin) == "ok",
        "kube-controller-manager": lambda: (
            _http_get(f"https://127.0.0.1:{ports['controller-manager']}/healthz") == "ok"
        ),
        "kube-scheduler": lambda: _http_get(f"https://127.0.0.1:{ports['scheduler']}/healthz") == "ok",
        "kwok": lambda: _http_get(f"http://127.0.0.1:{ports['kwok']}/healthz") is not None,
        "s3": lambda: _s3_ready(state),
        "prometheus": lambda: _http_get(f"http://127.0.0.1:{ports.get('prometheus')}/-/ready") is not None,
    }
    return checks[name]


# --- the commands each process runs -------------------------------------------------------------------


def _plan(state: dict, name: str) -> node.NodePlan:
    node_name = name.split("/")[1]
    for plan in node.plans_of(state):
        if plan.name == node_name:
            return plan
    raise KeyError(name)


def _argv(name: str, lay: Layout, state: dict) -> list[str]:
    p, kube = state["ports"], Path(state["bin"]["kubernetes"])
    if name.startswith("containerd/"):
        return node.containerd_argv(state["bin"]["containerd"], _plan(state, name))
    if name.startswith("kubelet/"):
        return node.kubelet_argv(state["bin"]["kubelet"], _plan(state, name), node.net_of(state))
    if name == "coredns":
        return node.coredns_argv(state["bin"]["coredns"], state["real_nodes"]["dns"]["corefile"])
    kc = str(lay.kubeconfig)
    common_component = [
        "--kubeconfig",
        kc,
        "--authentication-kubeconfig",
        kc,
        "--authorization-kubeconfig",
        kc,
        "--bind-address",
        "127.0.0.1",
    ]
    if name == "etcd":
        peer = f"http://127.0.0.1:{p['etcd-peer']}"
        return [
            str(Path(state["bin"]["etcd"]) / "etcd"),
            "--name",
            "kubetune",
            "--data-dir",
            str(lay.etcd),
            "--listen-client-urls",
            f"http://127.0.0.1:{p['etcd']}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{p['etcd']}",
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"kubetune={peer}",
            # A throwaway cluster: durability is not worth the fsync latency.
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ]
    if name == "kube-apiserver":
        return [
            str(kube / "kube-apiserver"),
            "--etcd-servers",
            f"http://127.0.0.1:{p['etcd']}",
            # Signed by the ground's CA for the `kubernetes` Service's names and address too, so pods
            # verify it with the ca.crt of their ServiceAccount volume (kube-root-ca.crt, from
            # --root-ca-file below).
            "--tls-cert-file",
            str(lay.apiserver_cert) + ".crt",
            "--tls-private-key-file",
            str(lay.apiserver_cert) + ".key",
            "--secure-port",
            str(p["apiserver"]),
            "--bind-address",
            "127.0.0.1",
            "--advertise-address",
            "127.0.0.1",
            # The reconciler refuses a loopback address for the `kubernetes` Service. Pods on real nodes
            # reach the Service's ClusterIP through the ground's DNAT (node.dnat_rules), and CoreDNS
            # answers its name with the ClusterIP, so no one needs its endpoints.
            "--endpoint-reconciler-type",
            "none",
            "--service-cluster-ip-range",
            SERVICE_CIDR,
            "--service-account-issuer",
            f"https://127.0.0.1:{p['apiserver']}",
            "--service-account-key-file",
            str(lay.sa_key),
            "--service-account-signing-key-file",
            str(lay.sa_key),
            # Node: what a kubelet may read and write (its node, its pods' secrets); RBAC: everyone else.
            "--authorization-mode",
            "Node,RBAC",
            "--token-auth-file",
            str(lay.tokens_csv),
            # Kubelets authenticate with certificates of the ground's CA (CN system:node:<name>).
            "--client-ca-file",
            str(lay.ca_crt),
            # logs/exec/port-forward: the apiserver calls the kubelet at its InternalIP (the nodes have
            # no DNS names here), with a client certificate, and checks the kubelet's serving certificate.
            "--kubelet-preferred-address-types",
            "InternalIP,Hostname",
            "--kubelet-client-certificate",
            str(lay.kubelet_client) + ".crt",
            "--kubelet-client-key",
            str(lay.kubelet_client) + ".key",
            "--kubelet-certificate-authority",
            str(lay.ca_crt),
            "--allow-privileged=true",
            "--profiling=false",
        ]
    if name == "kube-controller-manager":
        return [
            str(kube / "kube-controller-manager"),
            *common_component,
            "--secure-port",
            str(p["controller-manager"]),
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            "--service-account-private-key-file",
            str(lay.sa_key),
            "--root-ca-file",
            str(lay.ca_crt),
            "--controllers",
            ",".join(CONTROLLERS),
            "--cluster-cidr",
            POD_CIDR,
            "--service-cluster-ip-range",
            SERVICE_CIDR,
        ]
    if name == "kube-scheduler":
        return [
            str(kube / "kube-scheduler"),
            "--config",
            str(lay.scheduler_cfg),
            *common_component[2:],
            "--secure-port",
            str(p["scheduler"]),
        ]
    if name == "kwok":
        return [
            str(Path(state["bin"]["kwok"]) / "kwok"),
            "--kubeconfig",
            kc,
            "--config",
            str(lay.kwok_cfg),
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={fleet.KWOK_ANNOTATION}=fake",
            "--cidr",
            POD_CIDR,
            "--node-ip",
            "127.0.0.1",
            "--server-address",
            f"127.0.0.1:{p['kwok']}",
            "--node-lease-duration-seconds",
            "40",
        ]
    if name == "s3":
        c = state["s3"]
        return [
            str(Path(state["bin"]["s3s-fs"]) / "s3s-fs"),
            "--host",
            "127.0.0.1",
            "--port",
            str(p["s3"]),
            "--access-key",
            c["access_key"],
            "--secret-key",
            c["secret_key"],
            str(lay.s3_data),
        ]
    if name == "prometheus":
        return [
            state["prometheus_bin"],
            "--config.file",
            str(lay.prom_cfg),
            "--storage.tsdb.path",
            str(lay.prom_data),
            "--web.listen-address",
            f"127.0.0.1:{p['prometheus']}",
            "--web.enable-lifecycle",
            "--log.level",
            "warn",
        ]
    raise KeyError(name)


# --- files written before the processes start --------------------------------------------------------


def _fresh_cluster_files(lay: Layout, state: dict) -> None:
    """Wipe the previous cluster (etcd, certs, tokens, logs) and write what the processes read."""
    for d in (lay.etcd, lay.pki, lay.logs):
        shutil.rmtree(d, ignore_errors=True)
    lay.pki.mkdir(parents=True)
    lay.logs.mkdir(parents=True)
    # The service-account signing key: openssl is part of every Debian system, unlike Python's
    # cryptography package.
    subprocess.run(["openssl", "genrsa", "-out", str(lay.sa_key), "2048"], check=True, capture_output=True)
    admin, dev = secrets.token_hex(24), secrets.token_hex(24)
    state["admin_token"], state["dev_token"] = admin, dev
    lay.tokens_csv.write_text(render.tokens_csv(render.default_tokens(admin, dev)))
    for path, tok in ((lay.admin_token, admin), (lay.dev_token, dev)):
        path.write_text(tok + "\n")
        path.chmod(0o600)
    lay.tokens_csv.chmod(0o600)
    # The ground's CA (EC keys: instant) signs the apiserver's serving certificate, the kubelets'
    # certificates and the apiserver's client certificate for calling them.
    node.make_ca(lay.ca_crt, lay.ca_key)
    node.sign_cert(lay.ca_crt, lay.ca_key, lay.apiserver_cert, "kube-apiserver", (), "serverAuth", APISERVER_SANS)
    node.sign_cert(lay.ca_crt, lay.ca_key, lay.kubelet_client, KUBELET_CLIENT_USER, (), "clientAuth")
    lay.scheduler_cfg.write_text(json.dumps(render.scheduler_config(str(lay.kubeconfig)), indent=1))
    shutil.copyfile(Path(__file__).parent / "data" / "kwok-stages.yaml", lay.kwok_cfg)


def _s3_credentials(lay: Layout) -> dict:
    """Made once and kept with the data, so a client configured earlier keeps working after down/up."""
    if lay.s3_creds.exists():
        return json.loads(lay.s3_creds.read_text())
    lay.s3_data.mkdir(parents=True, exist_ok=True)
    creds = {"access_key": "kubetune" + secrets.token_hex(6), "secret_key": secrets.token_hex(20)}
    lay.s3_creds.write_text(json.dumps(creds))
    lay.s3_creds.chmod(0o600)
    return creds


def _write_kubeconfig(lay: Layout, state: dict) -> None:
    ca = lay.ca_crt.read_bytes()
    cfg = render.kubeconfig(
        f"https://127.0.0.1:{state['ports']['apiserver']}", ca, state["admin_token"], state["dev_token"]
    )
    lay.kubeconfig.write_text(json.dumps(cfg, indent=1) + "\n")  # JSON is YAML; no yaml import needed
    lay.kubeconfig.chmod(0o600)


# --- talking to the cluster and to S3 -----------------------------------------------------------------


def kubectl(
    state: dict, lay: Layout, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
) -> subprocess.CompletedProcess:
    cmd = [str(Path(state["bin"]["kubernetes"]) / "kubectl"), "--kubeconfig", str(lay.kubeconfig), *args]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise GroundError(f"kubectl {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def s3_client(state: dict):
    import boto3  # lazily: `kubetune dev status` must not pay for importing boto3
    from botocore.config import Config

    c = state["s3"]
    return boto3.client(
        "s3",
        endpoint_url=c["endpoint"],
        aws_access_key_id=c["access_key"],
        aws_secret_access_key=c["secret_key"],
        region_name=S3_REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}, connect_timeout=2, read_timeout=30),
    )


def _s3_ready(state: dict) -> bool:
    try:
        s3_client(state).list_buckets()
        return True
    except Exception:  # noqa: BLE001 - any failure just means "not yet"
        return False


def _create_buckets(state: dict) -> None:
    client = s3_client(state)
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for b in S3_BUCKETS:
        if b not in have:
            client.create_bucket(Bucket=b)


DEV_RBAC = {
    # The non-admin user may read most things in `default` (the built-in `view` role) and nothing else:
    # tests use it to check that RBAC denies what it should.
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "RoleBinding",
    "metadata": {"name": "kubetune-dev-view", "namespace": "default"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": render.DEV_USER}],
}


KUBELET_API_RBAC = {
    # What kubeadm grants the apiserver's kubelet client: the kubelet asks the apiserver (webhook
    # authorization) whether this user may use its API (logs, exec).
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "kubetune:apiserver-kubelet-api"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBELET_CLIENT_USER}],
}


def _seed_cluster(state: dict, lay: Layout) -> None:
    """RBAC for the non-admin user, then the fake fleet; wait until KWOK reports every node Ready."""
    items = [DEV_RBAC, KUBELET_API_RBAC, *fleet.manifests()]
    kubectl(state, lay, "apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    for m in fleet.manifests():
        # Node creation may drop status depending on version; set it through the status subresource.
        kubectl(
            state,
            lay,
            "patch",
            "node",
            m["metadata"]["name"],
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": m["status"]}),
        )
    kubectl(
        state,
        lay,
        "wait",
        "--for=condition=Ready",
        "node",
        "-l",
        f"{fleet.FLEET_LABEL}=true",
        "--timeout=60s",
        timeout=90,
    )
    wait_until(
        "the not-ready taints to be lifted",
        lambda: (
            "not-ready"
            not in kubectl(
                state, lay, "get", "nodes", "-l", f"{fleet.FLEET_LABEL}=true", "-o", "jsonpath={.items[*].spec.taints}"
            ).stdout
        ),
        60,
        0.3,
    )
    wait_until(
        "the aggregated `view` role",
        lambda: kubectl(
            state, lay, "get", "clusterrole", "view", "-o", "jsonpath={.rules}", check=False
        ).stdout.strip(),
        60,
        0.3,
    )
    wait_until(
        "serviceaccount default/default",
        lambda: kubectl(state, lay, "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0,
        60,
        0.3,
    )


# --- up / down / restart ------------------------------------------------------------------------------


def _start(name: str, lay: Layout, state: dict, log: Log, timeout: float = 60) -> procs.Proc:
    t0 = time.monotonic()
    proc = procs.spawn(name, _argv(name, lay, state), lay.logs / f"{name}.log")
    state["procs"][name] = proc.to_dict()
    save_state(lay, state)  # recorded before waiting, so `down` can stop it even if start-up fails
    _wait_ready(proc, _ready_check(name, lay, state), timeout)
    log(f"  {name:<24} pid {proc.pid:<8} ready in {time.monotonic() - t0:.1f}s")
    return proc


def _endpoints(state: dict) -> dict[str, str]:
    p = state["ports"]
    eps = {
        "etcd": f"http://127.0.0.1:{p['etcd']}",
        "kube-apiserver": f"https://127.0.0.1:{p['apiserver']}",
        "kube-controller-manager": f"https://127.0.0.1:{p['controller-manager']}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{p['scheduler']}/healthz",
        "kwok": f"http://127.0.0.1:{p['kwok']}/healthz",
        "s3": state["s3"]["endpoint"],
    }
    if "prometheus" in p:
        eps["prometheus"] = f"http://127.0.0.1:{p['prometheus']}"
    if state.get("real_nodes"):
        for plan in node.plans_of(state):
            ctrd, kubelet = node.proc_names(plan)
            eps[ctrd] = f"http://127.0.0.1:{plan.metrics_port}/v1/metrics"
            eps[kubelet] = f"http://127.0.0.1:{plan.healthz_port}/healthz"
        if dns := state["real_nodes"].get("dns"):  # absent in a ground started before CoreDNS was added
            # Its readiness endpoint on loopback, like the others'; it serves DNS on the bridge address.
            eps["coredns"] = f"http://127.0.0.1:{dns['ready_port']}/ready"
    return eps


def is_up(lay: Layout) -> bool:
    procs_ = recorded(load_state(lay))
    return bool(procs_) and all(procs.alive(p) for p in procs_.values())


def _new_state(lay: Layout, comps: dict) -> dict:
    names = ["etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok", "s3"]
    ports = dict(zip(names, procs.free_ports(len(names)), strict=True))
    return {
        "root": str(lay.root),
        "started_at": time.time(),
        "ports": ports,
        "procs": {},
        "bin": {n: str(c.dir) for n, c in comps.items()},
        "versions": {n: c.version for n, c in comps.items()},
        "s3": _s3_credentials(lay)
        | {"endpoint": f"http://127.0.0.1:{ports['s3']}", "region": S3_REGION, "buckets": list(S3_BUCKETS)},
    }


def _start_all(lay: Layout, state: dict, log: Log) -> None:
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "s3"):
        _start(name, lay, state, log, timeout=90 if name == "kube-apiserver" else 60)
        if name == "kube-apiserver":
            # The kubeconfig (the ground's CA, the admin and user tokens); every later component connects
            # with it.
            _write_kubeconfig(lay, state)
    _seed_cluster(state, lay)
    _create_buckets(state)
    state["endpoints"] = _endpoints(state)
    save_state(lay, state)


def _start_real_nodes(lay: Layout, state: dict, n: int, log: Log) -> None:
    """n real kubelet nodes (devenv/node.py): host set-up, then per node containerd, its images and the
    kubelet; then wait for every one to be Ready and give the GPU node its GPUs."""
    t0 = time.monotonic()
    plans = node.prepare(lay.root, state, n, [SERVICE_CIDR, POD_CIDR], lambda: save_state(lay, state), log)
    save_state(lay, state)
    # Cluster DNS on the bridge address, before any pod starts.
    _start("coredns", lay, state, log)
    for plan in plans:
        ctrd, kubelet = node.proc_names(plan)
        _start(ctrd, lay, state, log)
        node.import_base_images(state, plan, log)
        _start(kubelet, lay, state, log)
    names = [p.name for p in plans]
    wait_until(
        "the real nodes to register",
        lambda: kubectl(state, lay, "get", "nodes", *names, check=False).returncode == 0,
        60,
        0.3,
    )
    kubectl(state, lay, "wait", "--for=condition=Ready", *[f"node/{x}" for x in names], "--timeout=120s", timeout=150)
    for plan in plans:
        if plan.gpu:
            patch = node.gpu_status_patch(node.GPU_SPEC.gpu_count)
            kubectl(
                state, lay, "patch", "node", plan.name, "--subresource=status", "--type=json", "-p", json.dumps(patch)
            )
    log(f"  real nodes {', '.join(names)} Ready in {time.monotonic() - t0:.1f}s")


def up(
    lay: Layout | None = None,
    with_prometheus: bool = False,
    targets: list[str] | None = None,
    log: Log = _stderr,
    real_nodes: int | None = None,
) -> dict:
    """Start everything (building binaries first if missing); return the state. Idempotent when up.
    real_nodes: how many real kubelet nodes to add (default: default_real_nodes())."""
    from kubetune.devenv import build

    lay = lay or layout()
    n_real = default_real_nodes() if real_nodes is None else real_nodes
    if n_real < 0:
        raise GroundError(f"--real-nodes must be 0 or more, got {n_real}")
    if n_real and os.geteuid() != 0:
        raise GroundError("real nodes need root (cgroups, a bridge, mounts): run as root or use --real-nodes 0")
    state = load_state(lay)
    running = {n: p for n, p in recorded(state).items() if procs.alive(p)}
    if running and len(running) == len(recorded(state)):
        have = len((state or {}).get("real_nodes", {}).get("nodes", []))
        note = f"; it has {have} real node(s), not {n_real}: down and up to change that" if have != n_real else ""
        log(f"ground already up ({lay.root}){note}")
        if with_prometheus:
            start_prometheus(lay, targets or [], log)
        return up_state(lay)
    if running:
        raise GroundError(
            f"ground is partly up ({', '.join(running)} running, others dead): run `kubetune dev down` first"
        )
    if state and state.get("real_nodes"):
        raise GroundError(
            f"real nodes of an earlier ground in {lay.root} are not cleaned up: run `kubetune dev down` first"
        )
    comps = build.ensure_all(log)
    if n_real:
        comps |= build.ensure_real_node(comps["kubernetes"].version, log)
    t0 = time.monotonic()
    lay.root.mkdir(parents=True, exist_ok=True)
    state = _new_state(lay, comps)
    _fresh_cluster_files(lay, state)
    log(f"starting the ground in {lay.root} (kubernetes {comps['kubernetes'].version})")
    try:
        _start_all(lay, state, log)
        if n_real:
            _start_real_nodes(lay, state, n_real, log)
            state["endpoints"] = _endpoints(state)
            save_state(lay, state)
        if with_prometheus:
            start_prometheus(lay, targets or [], log)
    except BaseException:
        log("start-up failed; stopping what was started")
        down(lay, log=lambda m: None)
        raise
    log(f"ground up in {time.monotonic() - t0:.1f}s; kubeconfig {lay.kubeconfig}")
    return up_state(lay)


def down(lay: Layout | None = None, log: Log = _stderr) -> list[str]:
    """Stop every recorded process, last started first; return the names that would not die."""
    lay = lay or layout()
    state = load_state(lay)
    stuck = []
    running = recorded(state)
    if state and state.get("real_nodes"):
        # Real nodes first, in their own order (kubelet, pods, shims, containerd, then the host changes).
        left = node.teardown(lay.root, state, lambda name: name not in running or procs.stop(running.pop(name)), log)
        for item in left:
            log(f"  left over: {item}")
        stuck += left
        save_state(lay, state)
    for name, proc in sorted(running.items(), key=lambda kv: -rank(kv[0])):
        if procs.stop(proc):
            log(f"  stopped {name} (pid {proc.pid})")
        else:
            stuck.append(name)
            log(f"  {name} (pid {proc.pid}) still running after SIGKILL")
    if state is not None and not stuck:
        state["procs"] = {}
        state.pop("endpoints", None)
        save_state(lay, state)
    return stuck


def stop(name: str, lay: Layout | None = None, log: Log = _stderr) -> procs.Proc:
    """Stop one component but keep its record, so `start` brings it back on the same port and data
    (an outage of S3, say, while everything else runs)."""
    lay = lay or layout()
    procs_ = recorded(load_state(lay))
    if name not in procs_:
        raise GroundError(f"{name} is not running under {lay.root} (known: {', '.join(procs_) or 'none'})")
    if not procs.stop(procs_[name]):
        raise GroundError(f"{name} (pid {procs_[name].pid}) would not stop")
    log(f"stopped {name}: pid {procs_[name].pid}")
    return procs_[name]


def start(name: str, lay: Layout | None = None, log: Log = _stderr) -> procs.Proc:
    """Start a recorded component again with the same command (same port, same data); a live one is left as is."""
    lay = lay or layout()
    state = load_state(lay)
    procs_ = recorded(state)
    if name not in procs_:
        raise GroundError(f"{name} was never started under {lay.root} (known: {', '.join(procs_) or 'none'})")
    if procs.alive(procs_[name]):
        return procs_[name]
    assert state is not None  # it recorded the process
    proc = procs.respawn(procs_[name])
    state["procs"][name] = proc.to_dict()
    save_state(lay, state)
    _wait_ready(proc, _ready_check(name, lay, state), 60)
    log(f"started {name}: pid {proc.pid}")
    return proc


def restart(name: str, lay: Layout | None = None, log: Log = _stderr) -> procs.Proc:
    """Stop one component and start it again with the same command (same port, same data)."""
    stop(name, lay, log=lambda m: None)
    proc = start(name, lay, log=lambda m: None)
    log(f"restarted {name}: pid {proc.pid}")
    return proc


# --- Prometheus ---------------------------------------------------------------------------------------


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _stderr("prometheus not found; installing the Debian package")
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
            check=True,
            env=env,
            capture_output=True,
        )
        found = shutil.which("prometheus")
    if not found:
        raise GroundError("prometheus not found: install it with `apt-get install prometheus` (as root)")
    return found


def set_prometheus_targets(lay: Layout, targets: list[str]) -> list[str]:
    """Merge targets (host:port) into the file Prometheus watches; returns the full list."""
    current: list[str] = []
    if lay.prom_targets.exists():
        current = [t for group in json.loads(lay.prom_targets.read_text()) for t in group["targets"]]
    merged = sorted(set(current) | set(targets))
    lay.prom.mkdir(parents=True, exist_ok=True)
    tmp = lay.prom_targets.with_suffix(".tmp")
    tmp.write_text(render.prometheus_targets(merged))
    tmp.replace(lay.prom_targets)
    return merged


def start_prometheus(lay: Layout, targets: list[str], log: Log = _stderr) -> procs.Proc:
    state = load_state(lay)
    if not state or not state.get("procs"):
        raise GroundError("the ground is not up: run `kubetune dev up` first")
    set_prometheus_targets(lay, targets)
    if "prometheus" in state["procs"] and procs.alive(procs.Proc.from_dict(state["procs"]["prometheus"])):
        return procs.Proc.from_dict(state["procs"]["prometheus"])
    state["prometheus_bin"] = prometheus_binary()
    state["ports"]["prometheus"] = procs.free_port()
    lay.prom_cfg.write_text(json.dumps(render.prometheus_config(str(lay.prom_targets)), indent=1))
    proc = _start("prometheus", lay, state, log)
    state["endpoints"] = _endpoints(state)
    save_state(lay, state)
    return proc


# --- status and env -----------------------------------------------------------------------------------


def status_rows(lay: Layout) -> list[tuple[str, int, bool, str]]:
    state = load_state(lay)
    eps = _endpoints(state) if state and state.get("procs") else {}
    return [
        (n, p.pid, procs.alive(p), eps.get(n, ""))
        for n, p in sorted(recorded(state).items(), key=lambda kv: rank(kv[0]))
    ]


def env_values(lay: Layout) -> dict[str, str]:
    state = load_state(lay)
    if not state or not state.get("procs"):
        raise GroundError(f"the ground is not up (no running processes recorded in {lay.root})")
    s3 = state["s3"]
    values = {
        "KUBECONFIG": str(lay.kubeconfig),
        "KUBETUNE_DEV_DIR": str(lay.root),
        "KUBETUNE_DEV_USER_CONTEXT": render.DEV_CONTEXT,
        "AWS_ENDPOINT_URL_S3": s3["endpoint"],
        "KUBETUNE_S3_ENDPOINT": s3["endpoint"],
        "AWS_ACCESS_KEY_ID": s3["access_key"],
        "AWS_SECRET_ACCESS_KEY": s3["secret_key"],
        "AWS_DEFAULT_REGION": S3_REGION,
    }
    if "prometheus" in state["procs"]:
        values["KUBETUNE_PROMETHEUS_URL"] = f"http://127.0.0.1:{state['ports']['prometheus']}"
    if state.get("real_nodes"):
        # What a pod on a real node uses: inside a pod 127.0.0.1 is the pod itself.
        values["KUBETUNE_S3_POD_ENDPOINT"] = state["real_nodes"]["pod_endpoints"]["s3"]
        values["KUBETUNE_REAL_NODES"] = ",".join(p.name for p in node.plans_of(state))
    return values


def path_dirs(lay: Layout) -> list[str]:
    state = load_state(lay) or {}
    return [state["bin"][c] for c in ("kubernetes", "helm") if c in state.get("bin", {})]
