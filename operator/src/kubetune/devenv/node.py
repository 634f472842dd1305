"""Real kubelet nodes beside the KWOK fleet: per node its own containerd (runc), a CNI bridge and a kubelet
of the ground's Kubernetes version, so pods really run (ownership, mounts, signals, cgroup limits).

A real node changes the host, so everything it changes is recorded in the ground's state before it is
changed, and `kubetune dev down` undoes it: processes (by pid), container processes (by cgroup), shims (by
their containerd's address), mounts under the ground's directory, the cgroup root in every v1 hierarchy,
the bridge and its veths, the ground's own iptables chain, and the sysctls the kubelet sets. Sysctls and
iptables chains are host-wide, so several grounds share one record of them (/run/kubetune/host.json): the
first ground with real nodes records them, the last one down restores them.

Pods reach the node's own services through the bridge: the node's InternalIP is the bridge's address, and
the S3 server (which stays on loopback for everyone else) is DNATed from that address, for host processes
too, so one endpoint serves both. The `kubernetes` Service's address is DNATed to the apiserver from the
bridge only (a stand-in for kube-proxy, see dnat_rules), and CoreDNS on the bridge address serves
cluster.local. `ipMasq: false` and no default route keep the pods' traffic on this machine.

Real nodes are tainted `kubetune.io/real-node=true:NoSchedule` so the KWOK-based tests never land on them
by chance (their images exist only as imports here); a pod that means to run here tolerates the taint.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from kubetune.devenv import fleet, paths, procs

Log = Callable[[str], None]

TAINT_KEY = "kubetune.io/real-node"
LABEL = "kubetune.io/real-node"
# Pod subnets come from here, one /24 per ground; chosen apart from the ground's service CIDR (10.0.0.0/24),
# KWOK's pod CIDR (10.244.0.0/16) and whatever the host routes (192.0.2.0/24 on eth0 here).
POD_NET_POOL = "10.89.0.0/16"
# The fake GPUs of the real GPU node: GFD labels as on a real L4 node (compute capability 8.9, so bf16, the
# default precision, may land there), so placement works as on KWOK's.
GPU_SPEC = fleet.NodeSpec("real-0", "real", "2", "4Gi", fleet.L4, 1)
# What the kubelet sets when protectKernelDefaults is false, plus the forwarding switch CNI may flip.
WATCHED_SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops", "net.ipv4.ip_forward")
# Chains that the kubelet or the CNI plugins may add (the kubelet's are switched off, see kubelet_config).
FOREIGN_CHAIN_PREFIXES = ("KUBE-", "CNI-")
# The `kubernetes` Service's ClusterIP: the first address of the ground's service CIDR (ground.SERVICE_CIDR),
# which in-cluster clients dial (KUBERNETES_SERVICE_HOST, port 443).
KUBERNETES_VIP = "10.0.0.1"
CLUSTER_DOMAIN = "cluster.local"
HOST_DIR = Path("/run/kubetune")  # tmpfs: its record of the host's values lives as long as they do
MAX_SOCKET_PATH = 107  # sun_path is 108 bytes with the final NUL


class NodeError(RuntimeError):
    """A real node could not be set up or torn down; the message says what and where."""


# --- the plan: pure, unit-tested ----------------------------------------------------------------------


@dataclass(frozen=True)
class Net:
    bridge: str
    subnet: str
    gateway: str


@dataclass(frozen=True)
class NodePlan:
    name: str
    dir: str
    gpu: bool
    kubelet_port: int
    healthz_port: int
    metrics_port: int
    cgroup_root: str  # "/kubetune-<ground>-<node>", created in every v1 hierarchy
    range_start: str
    range_end: str

    @property
    def socket(self) -> str:
        return f"{self.dir}/ctrd.sock"

    def path(self, rel: str) -> str:
        return f"{self.dir}/{rel}"

    def to_dict(self) -> dict:
        return asdict(self)


def ground_id(root: Path) -> str:
    """Short and stable per state directory: names the ground's bridge, cgroups and iptables chain, so two
    grounds on one host never share them."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]


def bridge_name(gid: str) -> str:
    return f"kt{gid}"  # 10 characters; interface names stop at 15


def chain_name(gid: str) -> str:
    return f"KUBETUNE-{gid.upper()}"


def pick_subnet(taken: list[str], pool: str = POD_NET_POOL) -> ipaddress.IPv4Network:
    """The first /24 of the pool that overlaps none of `taken` (routes on this host, the ground's CIDRs,
    other grounds' bridges)."""
    used = [ipaddress.ip_network(t, strict=False) for t in taken]
    for net in ipaddress.IPv4Network(pool).subnets(new_prefix=24):
        if not any(net.overlaps(u) for u in used if u.version == 4):
            return net
    raise NodeError(f"no free /24 left in {pool} for the real nodes' pods (taken: {', '.join(taken)})")


def pod_ranges(subnet: str, n: int) -> list[tuple[str, str]]:
    """Split the host addresses after the gateway (.1) and a few spare ones into n equal ranges, one per
    node: every node's host-local IPAM hands out only its own range on the shared bridge."""
    if n < 1:
        raise ValueError("need at least one node")
    net = ipaddress.ip_network(subnet)
    first, last = int(net.network_address) + 16, int(net.broadcast_address) - 1
    size = (last - first + 1) // n
    if size < 4:
        raise NodeError(f"{subnet} is too small for {n} real nodes")
    return [
        (str(ipaddress.ip_address(first + i * size)), str(ipaddress.ip_address(first + (i + 1) * size - 1)))
        for i in range(n)
    ]


def plan_nodes(root: Path, n: int, subnet: str, ports: list[int]) -> list[NodePlan]:
    """n real nodes under <root>/nodes; node 0 carries the fake GPUs. `ports` holds 3 free ports a node."""
    if n < 0:
        raise ValueError(f"the number of real nodes must be >= 0, got {n}")
    if len(ports) < 3 * n:
        raise ValueError(f"need {3 * n} ports for {n} real nodes, got {len(ports)}")
    gid = ground_id(root)
    ranges = pod_ranges(subnet, n) if n else []
    plans = []
    for i in range(n):
        name = f"real-{i}"
        d = Path(root) / "nodes" / name
        kubelet_port, healthz_port, metrics_port = ports[3 * i : 3 * i + 3]
        plan = NodePlan(
            name=name,
            dir=str(d),
            gpu=True,  # every real node: a 2-node FineTuneJob (gpusPerNode 1) needs two that fit
            kubelet_port=kubelet_port,
            healthz_port=healthz_port,
            metrics_port=metrics_port,
            cgroup_root=f"/kubetune-{gid}-{name}",
            range_start=ranges[i][0],
            range_end=ranges[i][1],
        )
        # The kubelet makes sockets under its root dir too: pods-api/<10 digits>.
        if len(plan.path("kubelet/root/pods-api/0123456789")) > MAX_SOCKET_PATH:
            raise NodeError(
                f"the state directory {root} is too deep: the kubelet's sockets under {plan.path('kubelet/root')} "
                f"would pass the {MAX_SOCKET_PATH}-byte limit of a unix socket path; use a shorter --dir"
            )
        plans.append(plan)
    return plans


def toml(doc: dict, prefix: str = "") -> str:
    """A TOML writer for what containerd's config needs: tables, strings, booleans, integers, string lists.
    (The standard library only reads TOML.)"""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a valid TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"no TOML for {type(v).__name__}")

    def key(k: str) -> str:
        return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)

    scalars = [f"{key(k)} = {value(v)}\n" for k, v in doc.items() if not isinstance(v, dict)]
    out = ([f"[{prefix}]\n"] if prefix and scalars else []) + scalars
    for k, v in doc.items():
        if isinstance(v, dict):
            out.append(toml(v, f"{prefix}.{key(k)}" if prefix else key(k)))
    return "".join(out)


def containerd_config(plan: NodePlan) -> dict:
    """containerd 2.x (config version 3) with every path under the node's directory."""
    return {
        "version": 3,
        "root": plan.path("containerd/root"),
        "state": plan.path("containerd/state"),
        "temp": plan.path("containerd/tmp"),  # its temporary mounts, else under /tmp
        "grpc": {"address": plan.socket},
        "ttrpc": {"address": plan.socket + ".ttrpc"},
        "metrics": {"address": f"127.0.0.1:{plan.metrics_port}"},  # also its readiness probe
        "plugins": {
            # NRI would listen on the host-wide /var/run/nri/nri.sock; nothing here uses it.
            "io.containerd.nri.v1.nri": {"disable": True},
            # Else it writes to /opt/containerd.
            "io.containerd.internal.v1.opt": {"path": plan.path("containerd/opt")},
            # exec/attach streams, proxied by the kubelet: loopback, any free port.
            "io.containerd.grpc.v1.cri": {"stream_server_address": "127.0.0.1", "stream_server_port": "0"},
            "io.containerd.cri.v1.images": {
                "snapshotter": "overlayfs",
                # No registry.k8s.io here: the sandbox image is the one built and imported locally.
                "pinned_images": {"sandbox": paths.PAUSE_IMAGE},
            },
            "io.containerd.cri.v1.runtime": {
                # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails in runc's nsexec
                # ("failed to update /proc/self/oom_score_adj: Permission denied").
                "restrict_oom_score_adj": True,
                # Network namespaces bind-mounted under the node's state, not /var/run/netns, so `down`
                # finds them with the other mounts under the ground's directory.
                "netns_mounts_under_state_dir": True,
                "cni": {"bin_dirs": ["/usr/lib/cni"], "conf_dir": plan.path("cni/net.d"), "max_conf_num": 1},
                "containerd": {
                    "default_runtime_name": "runc",
                    "runtimes": {
                        "runc": {
                            "runtime_type": "io.containerd.runc.v2",
                            # Debian's runc; crun refuses the hybrid cgroup layout. cgroupfs as the kubelet.
                            # runc's state under the node too, not the host-wide /run/containerd/runc.
                            "options": {
                                "BinaryName": "/usr/sbin/runc",
                                "SystemdCgroup": False,
                                "Root": plan.path("containerd/runc"),
                            },
                        }
                    },
                },
            },
        },
    }


def cni_conflist(plan: NodePlan, net: Net) -> dict:
    """bridge + host-local + portmap on the ground's bridge. No masquerade and no default route: pods reach
    this host (the gateway) and each other, nothing beyond."""
    return {
        "cniVersion": "1.0.0",
        "name": "kubetune",
        "plugins": [
            {
                "type": "bridge",
                "bridge": net.bridge,
                # The bridge and its address exist before the kubelet (its node IP); isGateway would also
                # switch on the host's ip_forward, which nothing here needs.
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [
                        [
                            {
                                "subnet": net.subnet,
                                "rangeStart": plan.range_start,
                                "rangeEnd": plan.range_end,
                                "gateway": net.gateway,
                            }
                        ]
                    ],
                    # The `kubernetes` Service address only (no default route, no whole service CIDR): the
                    # host DNATs it to the apiserver and has nothing to forward (ip_forward stays as it is).
                    "routes": [{"dst": f"{KUBERNETES_VIP}/32", "gw": net.gateway}],
                    "dataDir": plan.path("cni/ipam"),  # not the host-wide /var/lib/cni/networks
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
        ],
    }


def kubelet_config(plan: NodePlan, net: Net, ca_file: str) -> dict:
    """KubeletConfiguration for this host: cgroup v1 (hybrid) through cgroupfs, no swap check, every path
    and port its own, images only from imports, webhook authn/authz against the apiserver."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # 1.35+ refuses cgroup v1 otherwise
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": plan.cgroup_root,
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{plan.socket}",
        "imageServiceEndpoint": f"unix://{plan.socket}",
        "podLogsDir": plan.path("kubelet/pod-logs"),
        "volumePluginDir": plan.path("kubelet/volume-plugins"),
        "address": net.gateway,
        "port": plan.kubelet_port,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": plan.healthz_port,
        "readOnlyPort": 0,
        "tlsCertFile": plan.path("kubelet/pki/serving.crt"),
        "tlsPrivateKeyFile": plan.path("kubelet/pki/serving.key"),
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": ca_file},
        },
        "authorization": {"mode": "Webhook"},
        # Images exist only as imports: never collect them, never evict for a nearly full disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        # The KUBE-FIREWALL/KUBE-*-CANARY chains are host-wide and shared by every kubelet; no kube-proxy
        # runs here, so nothing needs them.
        "makeIPTablesUtilChains": False,
        "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
        "maxPods": 50,
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "resolvConf": "/etc/resolv.conf",
        # CoreDNS of this ground listens on the bridge address (corefile).
        "clusterDNS": [net.gateway],
        "clusterDomain": CLUSTER_DOMAIN,
    }


def node_labels(plan: NodePlan) -> dict[str, str]:
    labels = {LABEL: "true", "node.kubernetes.io/instance-type": "real"}
    if plan.gpu:
        labels |= fleet.gfd_labels(GPU_SPEC)
    return labels


def gpu_status_patch(count: int) -> list[dict]:
    """A JSON patch for the node's status: the fake GPUs, with no device plugin (whose socket path is
    host-wide and would be shared by every kubelet). It survives the kubelet's status updates."""
    return [
        {"op": "add", "path": f"/status/{field}/nvidia.com~1gpu", "value": str(count)}
        for field in ("capacity", "allocatable")
    ]


def kubelet_kubeconfig(server: str, ca_pem: bytes, cert: str, key: str) -> dict:
    import base64

    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune",
                "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()},
            }
        ],
        "users": [{"name": "kubelet", "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": "kubelet", "context": {"cluster": "kubetune", "user": "kubelet"}}],
        "current-context": "kubelet",
    }


def corefile(net: Net, kubeconfig: str, ready_port: int) -> str:
    """CoreDNS for the pods: cluster.local from the apiserver (Services, headless Services' endpoints by
    hostname), on the bridge address only (the pods' clusterDNS), port 53 UDP and TCP. There is no other
    zone and no forwarder, so any other name is REFUSED here and never asked of anything beyond the host.
    `ready` (loopback) answers 200 once the kubernetes plugin has synced: the ground's readiness check."""
    return (
        f"{CLUSTER_DOMAIN}:53 {{\n"
        f"    bind {net.gateway}\n"
        f"    ready 127.0.0.1:{ready_port}\n"
        "    errors\n"
        f"    kubernetes {CLUSTER_DOMAIN} {{\n"
        f"        kubeconfig {kubeconfig}\n"
        "    }\n"
        "}\n"
    )


def coredns_argv(bin_dir: str, corefile_path: str) -> list[str]:
    return [f"{bin_dir}/coredns", "-conf", corefile_path]


def containerd_argv(bin_dir: str, plan: NodePlan) -> list[str]:
    return [f"{bin_dir}/containerd", "--config", plan.path("containerd/config.toml")]


def kubelet_argv(bin_dir: str, plan: NodePlan, net: Net) -> list[str]:
    labels = ",".join(f"{k}={v}" for k, v in sorted(node_labels(plan).items()))
    return [
        f"{bin_dir}/kubelet",
        "--config",
        plan.path("kubelet/config.json"),
        "--kubeconfig",
        plan.path("kubelet/kubeconfig"),
        # Else /var/lib/kubelet, shared by every kubelet on the host.
        "--root-dir",
        plan.path("kubelet/root"),
        "--cert-dir",
        plan.path("kubelet/pki"),
        "--hostname-override",
        plan.name,
        "--node-ip",
        net.gateway,
        "--node-labels",
        labels,
        "--v",
        "1",
    ]


# --- certificates (openssl: part of every Debian, unlike Python's cryptography) ------------------------


def cert_subject(cn: str, orgs: tuple[str, ...] = ()) -> str:
    for v in (cn, *orgs):
        if not v or any(c in v for c in "/=\n"):
            raise ValueError(f"invalid certificate name {v!r}")
    return "".join(f"/O={o}" for o in orgs) + f"/CN={cn}"


def cert_extensions(usage: str, sans: tuple[str, ...] = ()) -> str:
    if usage not in ("serverAuth", "clientAuth"):
        raise ValueError(f"usage must be serverAuth or clientAuth, got {usage!r}")
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if sans:
        lines.append("subjectAltName=" + ",".join(sans))
    return "\n".join(lines) + "\n"


def _openssl(*args: str) -> None:
    res = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise NodeError(f"openssl {args[0]} failed: {res.stderr.strip()}")


def make_ca(crt: Path, key: Path, cn: str = "kubetune-dev-ca") -> None:
    crt.parent.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(crt), "-days", "3650", "-subj", cert_subject(cn),
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    key.chmod(0o600)


def sign_cert(
    ca_crt: Path, ca_key: Path, out: Path, cn: str, orgs: tuple[str, ...], usage: str, sans: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    """A key and a certificate signed by the ground's CA: out.crt, out.key."""
    out.parent.mkdir(parents=True, exist_ok=True)
    crt, key, csr, ext = (out.with_suffix(s) for s in (".crt", ".key", ".csr", ".ext"))
    ext.write_text(cert_extensions(usage, sans))
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", str(key), "-out", str(csr), "-subj", cert_subject(cn, orgs),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-set_serial",
        str(int.from_bytes(os.urandom(8), "big")), "-days", "365", "-extfile", str(ext), "-out", str(crt),
    )  # fmt: skip
    key.chmod(0o600)
    csr.unlink()
    ext.unlink()
    return crt, key


# --- host: cgroups, bridge, iptables, sysctls, mounts ---------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed (exit {res.returncode}): {res.stderr.strip()}")
    return res


def mountinfo(text: str | None = None) -> list[tuple[str, str]]:
    """(mount point, fs type) of every mount, in mount order. Octal escapes (\\040 for a space) decoded."""
    text = Path("/proc/self/mountinfo").read_text() if text is None else text
    out = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4].encode().decode("unicode_escape")
        out.append((point, right.split()[0]))
    return out


def cgroup_v1_hierarchies(text: str | None = None) -> list[str]:
    """The mount point of every cgroup v1 hierarchy (cpu, memory, ..., name=systemd); not cgroup2."""
    return [p for p, fs in mountinfo(text) if fs == "cgroup"]


def cgroup_hierarchies(text: str | None = None) -> list[str]:
    """Every cgroup mount, v1 and v2: in the hybrid layout runc also makes the containers' cgroups in the
    cgroup2 tree (/sys/fs/cgroup/unified), so that is where they are found and removed too."""
    return [p for p, fs in mountinfo(text) if fs in ("cgroup", "cgroup2")]


def mounts_under(root: Path, text: str | None = None) -> list[str]:
    """Mount points at or below root, deepest (latest) first: the order to unmount them in."""
    r = str(Path(root).resolve())
    return [p for p, _ in reversed(mountinfo(text)) if p == r or p.startswith(r + "/")]


def make_cgroup_root(name: str) -> None:
    for h in cgroup_v1_hierarchies():
        d = Path(h) / name.lstrip("/")
        d.mkdir(exist_ok=True)
        if Path(h, "cpuset.cpus").exists():
            # A new cpuset starts empty, and an empty cpuset admits no process.
            for f in ("cpuset.cpus", "cpuset.mems"):
                (d / f).write_text(Path(h, f).read_text())


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for h in cgroup_hierarchies():
        d = Path(h) / name.lstrip("/")
        if d.is_dir():
            for procs_file in d.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in procs_file.read_text().split()}
    return pids


def remove_cgroup_root(name: str) -> list[str]:
    """rmdir the cgroup tree in every hierarchy, leaves first; returns what could not be removed."""
    left = []
    for h in cgroup_hierarchies():
        d = Path(h) / name.lstrip("/")
        if not d.is_dir():
            continue
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [d]:
            try:
                sub.rmdir()
            except OSError as e:
                left.append(f"{sub}: {e.strerror}")
    return left


def host_routes() -> list[str]:
    """Every IPv4 destination routed here (any table), as networks."""
    out = _run("ip", "-j", "-4", "route", "show", "table", "all").stdout
    dsts = [r.get("dst", "default") for r in json.loads(out or "[]")]
    return [d if "/" in d else f"{d}/32" for d in dsts if d != "default"]


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def create_bridge(net: Net) -> None:
    """The bridge with its address, before the kubelet: that address is the node's IP, which the kubelet
    requires to be on an interface. route_localnet on this bridge only lets the DNAT to loopback services
    work (it goes away with the bridge)."""
    prefix = ipaddress.ip_network(net.subnet).prefixlen
    if not link_exists(net.bridge):
        _run("ip", "link", "add", net.bridge, "type", "bridge")
    _run("ip", "addr", "replace", f"{net.gateway}/{prefix}", "dev", net.bridge)
    _run("ip", "link", "set", net.bridge, "up")
    Path(f"/proc/sys/net/ipv4/conf/{net.bridge}/route_localnet").write_text("1\n")


def delete_bridge(net: Net) -> None:
    if not link_exists(net.bridge):
        return
    # veths left behind (a pod whose netns outlived its processes) go first, with the bridge.
    for link in json.loads(_run("ip", "-j", "link", "show", "master", net.bridge, check=False).stdout or "[]"):
        _run("ip", "link", "del", link["ifname"], check=False)
    _run("ip", "link", "del", net.bridge)


def jump_rules(chain: str, net: Net) -> list[list[str]]:
    """The nat rules (without -A/-D) that send traffic into the ground's chain: what its pods send (in on
    its bridge), and what host processes send to its gateway address, so an operator on the host reaches
    S3 at the same endpoint as the pods (a FineTuneJob names one endpoint for both)."""
    tail = ["-m", "comment", "--comment", "kubetune dev", "-j", chain]
    return [["PREROUTING", "-i", net.bridge, *tail], ["OUTPUT", "-d", f"{net.gateway}/32", *tail]]


def dnat_rules(chain: str, net: Net, ports: list[int], apiserver_port: int | None = None) -> list[list[str]]:
    """iptables commands (without the binary) that expose loopback-only services to the pods (and host
    processes) at the gateway address, same port: the S3 server stays on 127.0.0.1 for everyone else.

    With apiserver_port, also the `kubernetes` Service (KUBERNETES_VIP:443) for the pods: a stand-in for
    kube-proxy, whose chains (KUBE-SERVICES, ...) are host-wide with fixed names, jumped to from PREROUTING
    and OUTPUT for every interface and rewritten wholesale on each sync, so two grounds side by side (same
    service CIDR) would overwrite each other's VIPs. This rule is reached from this ground's bridge only."""
    cmds = [["-t", "nat", "-N", chain], *(["-t", "nat", "-A", *j] for j in jump_rules(chain, net))]
    for p in ports:
        cmds.append(
            ["-t", "nat", "-A", chain, "-d", f"{net.gateway}/32", "-p", "tcp", "--dport", str(p), "-j", "DNAT",
             "--to-destination", f"127.0.0.1:{p}"]
        )  # fmt: skip
    if apiserver_port:
        cmds.append(
            ["-t", "nat", "-A", chain, "-i", net.bridge, "-d", f"{KUBERNETES_VIP}/32", "-p", "tcp", "--dport", "443",
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{apiserver_port}"]
        )  # fmt: skip
    return cmds


def remove_dnat(chain: str, net: Net) -> None:
    for jump in jump_rules(chain, net):
        while _run("iptables", "-t", "nat", "-D", *jump, check=False).returncode == 0:
            pass
    _run("iptables", "-t", "nat", "-F", chain, check=False)
    _run("iptables", "-t", "nat", "-X", chain, check=False)


def chains(save_output: str, user_only: bool = False) -> dict[str, set[str]]:
    """{table: chain names} from iptables-save output; user_only: without the built-in chains (those
    have a policy, a user chain has "-")."""
    out: dict[str, set[str]] = {}
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            out.setdefault(table, set())
        elif line.startswith(":") and table:
            name, policy = line[1:].split()[:2]
            if not (user_only and policy != "-"):
                out[table].add(name)
    return out


def empty_tables(save_output: str) -> list[str]:
    """Tables with no rule and no user chain: what iptables-nft leaves after the last rule is gone."""
    busy = {t for t, c in chains(save_output, user_only=True).items() if c}
    table = ""
    for line in save_output.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            busy.add(table)
    return sorted(set(chains(save_output)) - busy)


def remove_new_tables(baseline: dict[str, dict[str, list[str]]]) -> list[str]:
    """iptables-nft creates a table on first use (the DNAT makes `nat`); delete the ones that did not
    exist before and are empty again. (With legacy iptables every table always exists: nothing to do.)"""
    if shutil.which("nft") is None:
        return []
    removed = []
    for tool, family in (("iptables", "ip"), ("ip6tables", "ip6")):
        for table in empty_tables(_run(f"{tool}-save", check=False).stdout):
            if (
                table not in baseline.get(tool, {})
                and _run("nft", "delete", "table", family, table, check=False).returncode == 0
            ):
                removed.append(f"{family} {table}")
    return removed


def _saved_chains() -> dict[str, dict[str, list[str]]]:
    return {
        tool: {t: sorted(c) for t, c in chains(_run(f"{tool}-save", check=False).stdout).items()}
        for tool in ("iptables", "ip6tables")
    }


def remove_new_chains(baseline: dict[str, dict[str, list[str]]]) -> list[str]:
    """Delete the KUBE-*/CNI-* chains that were not there before (and the rules jumping to them)."""
    removed = []
    for tool, now in _saved_chains().items():
        for table, names in now.items():
            new = {c for c in names if c.startswith(FOREIGN_CHAIN_PREFIXES)} - set(
                baseline.get(tool, {}).get(table, [])
            )
            if not new:
                continue
            for rule in _run(tool, "-t", table, "-S", check=False).stdout.splitlines():
                words = rule.split()
                if words[:1] == ["-A"] and "-j" in words and words[words.index("-j") + 1] in new:
                    _run(tool, "-t", table, "-D", *words[1:], check=False)
            for c in sorted(new):
                _run(tool, "-t", table, "-F", c, check=False)
            for c in sorted(new):
                if _run(tool, "-t", table, "-X", c, check=False).returncode == 0:
                    removed.append(f"{tool} {table} {c}")
    return removed


def read_sysctls(names: tuple[str, ...] = WATCHED_SYSCTLS) -> dict[str, str]:
    return {n: Path("/proc/sys", n.replace(".", "/")).read_text().strip() for n in names}


def restore_sysctls(before: dict[str, str]) -> list[str]:
    changed = []
    now = read_sysctls(tuple(before))
    for n, v in before.items():
        if now[n] != v:
            Path("/proc/sys", n.replace(".", "/")).write_text(v + "\n")
            changed.append(f"{n}={v}")
    return changed


def _host_lock() -> contextlib.AbstractContextManager[None]:
    return paths.file_lock(HOST_DIR / "host.lock")


def _host_record() -> dict:
    try:
        return json.loads((HOST_DIR / "host.json").read_text())
    except FileNotFoundError:
        return {"grounds": []}


def _save_host_record(rec: dict) -> None:
    tmp = HOST_DIR / "host.json.tmp"
    tmp.write_text(json.dumps(rec, indent=1) + "\n")
    tmp.replace(HOST_DIR / "host.json")


def _live_grounds(rec: dict) -> list[str]:
    """Grounds in the record whose state still lists real nodes (a ground that crashed without `down`
    keeps its place until then: its kubelet's changes may still be in force)."""
    live = []
    for root in rec["grounds"]:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(Path(root, "state.json").read_text()).get("real_nodes"):
                live.append(root)
    return live


def claim_host(root: Path, taken: list[str]) -> Net:
    """Join the host record (recording sysctls and chains when the first ground joins) and pick this
    ground's bridge and subnet, under one lock so two grounds starting at once never pick the same."""
    gid = ground_id(root)
    with _host_lock():
        rec = _host_record()
        rec["grounds"] = _live_grounds(rec)
        if not rec["grounds"]:
            rec = {"grounds": [], "sysctls": read_sysctls(), "chains": _saved_chains()}
        if str(root) not in rec["grounds"]:
            rec["grounds"].append(str(root))
        others = [r.get("subnet") for r in rec.get("subnets", {}).values()]
        subnet = pick_subnet([*taken, *host_routes(), *[o for o in others if o]])
        rec.setdefault("subnets", {})[str(root)] = {"subnet": str(subnet)}
        _save_host_record(rec)
    return Net(bridge_name(gid), str(subnet), str(subnet.network_address + 1))


def release_host(root: Path, log: Log) -> None:
    """Leave the host record; the last ground out restores the sysctls and removes the new chains."""
    with _host_lock():
        rec = _host_record()
        rec["grounds"] = [r for r in _live_grounds(rec) if r != str(root)]
        rec.get("subnets", {}).pop(str(root), None)
        if rec["grounds"]:
            _save_host_record(rec)
            log(f"  host sysctls and chains left as they are: {len(rec['grounds'])} other ground(s) with real nodes")
            return
        restored = restore_sysctls(rec.get("sysctls", {}))
        removed = remove_new_chains(rec.get("chains", {}))
        removed += [f"table {t}" for t in remove_new_tables(rec.get("chains", {}))]
        (HOST_DIR / "host.json").unlink(missing_ok=True)
    if restored:
        log(f"  restored sysctls: {', '.join(restored)}")
    if removed:
        log(f"  removed iptables chains: {', '.join(removed)}")


def unmount_under(root: Path) -> list[str]:
    """Unmount everything at or below root, deepest first; a busy one lazily. Returns what stays mounted."""
    for point in mounts_under(root):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "-l", point, check=False)
    return mounts_under(root)


# --- processes the runtime starts outside our process groups ---------------------------------------------


def shim_pids(socket: str) -> list[int]:
    """containerd-shim-runc-v2 processes of one containerd: each runs in a process group of its own, so
    stopping containerd's group leaves them; their command line names the containerd's address."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if argv[0].endswith(b"containerd-shim-runc-v2") and socket.encode() in argv:
                    out.append(int(entry.name))
    return out


def kill_cgroup(name: str, timeout: float = 15) -> set[int]:
    """SIGKILL every process in the node's cgroup tree (the pods' containers) until none is left."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return cgroup_pids(name)


def stop_shims(socket: str) -> list[int]:
    left = []
    for pid in shim_pids(socket):
        ticks = procs.start_ticks(pid)
        if ticks is not None and not procs.stop(procs.Proc("shim", pid, [], "", ticks), timeout=5):
            left.append(pid)
    return left


# --- images --------------------------------------------------------------------------------------------


def ctr(containerd_bin: str, socket: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [f"{containerd_bin}/ctr", "--address", socket, "-n", "k8s.io", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        raise NodeError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
    return res


def images(containerd_bin: str, socket: str) -> set[str]:
    return set(ctr(containerd_bin, socket, "images", "ls", "-q").stdout.split())


def import_image(
    node: dict | NodePlan, archive: Path, ref: str | None = None, containerd_bin: str | None = None
) -> None:
    """Import an OCI archive into a real node's containerd (the namespace the kubelet uses), unless `ref`
    is already there. `node` is a NodePlan or its dict from the ground's state (state["real_nodes"]
    ["nodes"][i], which also names the containerd binaries)."""
    d = node.to_dict() if isinstance(node, NodePlan) else node
    bin_dir = containerd_bin or d.get("containerd_bin") or str(paths.bin_cache("containerd", paths.CONTAINERD_VERSION))
    socket = f"{d['dir']}/ctrd.sock"
    if ref and ref in images(bin_dir, socket):
        return
    if not Path(archive).is_file():
        raise NodeError(f"no image archive at {archive}")
    ctr(bin_dir, socket, "images", "import", "--all-platforms", str(archive))


# --- up and down (called by ground.py) -------------------------------------------------------------------


def net_of(state: dict) -> Net:
    return Net(**state["real_nodes"]["net"])


def plans_of(state: dict) -> list[NodePlan]:
    return [
        NodePlan(**{k: v for k, v in d.items() if k in NodePlan.__dataclass_fields__})
        for d in state["real_nodes"]["nodes"]
    ]


def proc_names(plan: NodePlan) -> tuple[str, str]:
    return f"containerd/{plan.name}", f"kubelet/{plan.name}"


def _write_json(path: Path, doc: dict, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    path.chmod(mode)


def prepare(root: Path, state: dict, n: int, taken: list[str], save: Callable[[], None], log: Log) -> list[NodePlan]:
    """Host changes and files for n real nodes, each recorded in state (and saved) before it is made."""
    if os.geteuid() != 0:
        raise NodeError("real nodes need root (cgroups, a bridge, mounts): run as root or use --real-nodes 0")
    if state.get("real_nodes"):
        raise NodeError(f"the ground in {root} already has real nodes; run `kubetune dev down` first")
    t0 = time.monotonic()
    net = claim_host(root, taken)
    ports = procs.free_ports(3 * n + 1)  # 3 a node, and CoreDNS's readiness port
    plans = plan_nodes(root, n, net.subnet, ports[:-1])
    gid = ground_id(root)
    dns_dir = Path(root) / "coredns"
    state["real_nodes"] = {
        "net": asdict(net),
        "chain": chain_name(gid),
        "nodes": [p.to_dict() | {"containerd_bin": state["bin"]["containerd"]} for p in plans],
        "pod_endpoints": {},
        "dns": {"corefile": str(dns_dir / "Corefile"), "ready_port": ports[-1]},
    }
    save()
    create_bridge(net)
    s3_port = state["ports"]["s3"]
    for cmd in dnat_rules(chain_name(gid), net, [s3_port], state["ports"]["apiserver"]):
        _run("iptables", *cmd)
    state["real_nodes"]["pod_endpoints"]["s3"] = f"http://{net.gateway}:{s3_port}"
    pki = Path(root) / "pki"
    ca_crt, ca_key = pki / "ca.crt", pki / "ca.key"
    # The apiserver's serving certificate is signed by the ground's CA (ground._fresh_cluster_files).
    apiserver_ca = ca_crt.read_bytes()
    dns_dir.mkdir(exist_ok=True)
    (dns_dir / "Corefile").write_text(corefile(net, str(Path(root) / "kubeconfig"), ports[-1]))
    server = f"https://127.0.0.1:{state['ports']['apiserver']}"
    for plan in plans:
        d = Path(plan.dir)
        # Fresh per `up` like the rest of the cluster, except containerd's root: its imported images stay.
        for sub in ("kubelet", "cni", "containerd/state", "containerd/opt", "containerd/tmp", "containerd/runc"):
            _rm_tree(d / sub)
        make_cgroup_root(plan.cgroup_root)
        (d / "kubelet/pod-logs").mkdir(parents=True)
        (d / "kubelet/volume-plugins").mkdir(parents=True)
        (d / "containerd").mkdir(parents=True, exist_ok=True)
        (d / "containerd/config.toml").write_text(toml(containerd_config(plan)))
        # Written before containerd starts: a conflist moved in later was ignored.
        _write_json(d / "cni/net.d/10-kubetune.conflist", cni_conflist(plan, net))
        (d / "cni/ipam").mkdir(parents=True)
        sign_cert(ca_crt, ca_key, d / "kubelet/pki/serving", f"system:node:{plan.name}", ("system:nodes",),
                  "serverAuth", (f"IP:{net.gateway}", "IP:127.0.0.1", f"DNS:{plan.name}"))  # fmt: skip
        crt, key = sign_cert(
            ca_crt, ca_key, d / "kubelet/pki/client", f"system:node:{plan.name}", ("system:nodes",), "clientAuth"
        )
        _write_json(d / "kubelet/kubeconfig", kubelet_kubeconfig(server, apiserver_ca, str(crt), str(key)), 0o600)
        _write_json(d / "kubelet/config.json", kubelet_config(plan, net, str(ca_crt)))
    log(f"  real nodes: bridge {net.bridge} {net.subnet}, {n} node(s) prepared in {time.monotonic() - t0:.1f}s")
    return plans


def _rm_tree(path: Path) -> None:
    if mounts_under(path):
        raise NodeError(f"{path} still has mounts ({', '.join(mounts_under(path)[:3])}): run `kubetune dev down`")
    shutil.rmtree(path, ignore_errors=True)


def import_base_images(state: dict, plan: NodePlan, log: Log) -> None:
    """The pause image (before the kubelet: it is the sandbox) and the Debian base for test pods."""
    from kubetune.devenv import oci

    t0 = time.monotonic()
    bin_dir = state["bin"]["containerd"]
    have = images(bin_dir, plan.socket)
    todo = [(Path(state["bin"]["pause"]) / "pause.oci.tar", paths.PAUSE_IMAGE), (oci.debian_base(log), oci.BASE_REF)]
    for archive, ref in todo:
        if ref not in have:
            import_image(plan, archive, containerd_bin=bin_dir)
    log(f"  {plan.name}: images ready in {time.monotonic() - t0:.1f}s")


def teardown(root: Path, state: dict, stop: Callable[[str], bool], log: Log) -> list[str]:
    """Undo everything prepare() and the runtime did, in dependency order; returns what is left over.

    `stop(name)` stops a recorded process of the ground by its pid (True when gone)."""
    rn = state.get("real_nodes")
    if not rn:
        return []
    left: list[str] = []
    plans, net = plans_of(state), net_of(state)
    for plan in plans:
        ctrd, kubelet = proc_names(plan)
        # The kubelet first, so it restarts nothing; then the pods, their shims, and containerd.
        if not stop(kubelet):
            left.append(kubelet)
        if pids := kill_cgroup(plan.cgroup_root):
            left.append(f"{plan.name} container processes {sorted(pids)}")
        if shims := stop_shims(plan.socket):
            left.append(f"{plan.name} shims {shims}")
        if not stop(ctrd):
            left.append(ctrd)
    if still := unmount_under(Path(root)):
        left.append(f"mounts {still}")
    for plan in plans:
        left += remove_cgroup_root(plan.cgroup_root)
    remove_dnat(rn["chain"], net)
    try:
        delete_bridge(net)
    except NodeError as e:
        left.append(str(e))
    if not left:
        del state["real_nodes"]
        release_host(Path(root), log)
        log(f"  real nodes removed: bridge {net.bridge}, cgroups, mounts")
    return left
