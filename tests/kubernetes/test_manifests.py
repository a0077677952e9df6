"""deploy/kubernetes: valid against the Kubernetes schemas (offline), and what the contract says.

Then the pod itself, simulated with the kernel's own pieces (podsim.py) from the manifest
(its uid, capabilities, PID namespace, volumes and init containers): the daemon must produce
the right map, follow the host's mounts, answer its probe, write its labels and serve its
metrics, while code run in its container with its privileges can do none of what the
security review did from the first version of the pod.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.nsrun import run_scenario_module
from watcher.config import load_config_file, parse_listen
from watcher.contract import DEFAULT_CONFIG, config_file_problem

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (the test extra has it)"
)

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "deploy" / "kubernetes"
MONITORING = BASE / "monitoring"
BUILD_SCRIPT = REPO / "deploy" / "container" / "build.sh"
# The oldest Kubernetes the base is meant for, and the newest schemas the package has.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
DEV_ROOT = "/run/nvidia/driver/dev"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _resources() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    found: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        found.extend(_documents(BASE / name))
    return found


def _one(kind: str) -> dict[str, Any]:
    matches = [doc for doc in _resources() if doc["kind"] == kind]
    assert len(matches) == 1, f"{kind}: {len(matches)}"
    return matches[0]


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = _one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container(name: str, *, init: bool = False) -> dict[str, Any]:
    containers = _pod()["initContainers" if init else "containers"]
    return next(c for c in containers if c["name"] == name)


def _volume(name: str) -> dict[str, Any]:
    return next(v for v in _pod()["volumes"] if v["name"] == name)


def _mount(container: dict[str, Any], path: str) -> dict[str, Any]:
    return next(m for m in container["volumeMounts"] if m["mountPath"] == path)


def capabilities_added(container: dict[str, Any]) -> list[str]:
    """What the container keeps: `drop: [ALL]` and then only `add:`."""
    capabilities = container["securityContext"]["capabilities"]
    assert capabilities["drop"] == ["ALL"]
    added: list[str] = capabilities.get("add", [])
    return added


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid(version: str) -> None:
    files = [
        BASE / name
        for name in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    ]
    assert files
    for path in files:
        for document in _documents(path):
            kubernetes_validate.validate(document, version, strict=True)


def test_the_kustomization_renders_to_valid_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    assert sorted(doc["kind"] for doc in documents) == [
        "ConfigMap",
        "DaemonSet",
        "Namespace",
        "NetworkPolicy",
        "ServiceAccount",
    ]
    for document in documents:
        assert document["metadata"].get("namespace", "gpu-device-watcher") == "gpu-device-watcher"
        kubernetes_validate.validate(document, VERSIONS[-1], strict=True)
    daemonset = next(doc for doc in documents if doc["kind"] == "DaemonSet")
    images = {c["image"] for c in daemonset["spec"]["template"]["spec"]["containers"]}
    images |= {c["image"] for c in daemonset["spec"]["template"]["spec"]["initContainers"]}
    assert images == {f"{_built_image()}"}
    # The generated ConfigMap (name with a hash suffix) is the one the pod mounts, holding
    # config.toml as it is in the base.
    config_map = next(doc for doc in documents if doc["kind"] == "ConfigMap")
    volumes = daemonset["spec"]["template"]["spec"]["volumes"]
    mounted = next(v for v in volumes if v["name"] == "config")["configMap"]["name"]
    assert mounted == config_map["metadata"]["name"]
    assert mounted.startswith("gpu-device-watcher-config-")
    assert config_map["data"] == {"config.toml": (BASE / "config.toml").read_text()}


def _built_image() -> str:
    """The image name and tag the build script makes."""
    text = BUILD_SCRIPT.read_text()
    name = next(
        line.split("=", 1)[1].strip('"')
        for line in text.splitlines()
        if line.startswith("IMAGE_NAME=")
    )
    from watcher import __version__

    return f"{name}:{__version__}"


def test_namespace_and_service_account() -> None:
    assert _one("Namespace")["metadata"]["name"] == "gpu-device-watcher"
    account = _one("ServiceAccount")
    assert account["metadata"]["name"] == "gpu-device-watcher"
    assert account["automountServiceAccountToken"] is False
    assert _pod()["serviceAccountName"] == "gpu-device-watcher"
    assert _pod()["automountServiceAccountToken"] is False


# The daemon's uid and gid: its own (docs/kubernetes.md says why not 65534).
DAEMON_UID = 65530
# What the daemon reads of the host, each bound read-only at /host + its host path.
HOST_READS = {"/dev", "/run/nvidia", "/usr", "/proc"}
# Where the host mounts later and the pod must see it (the driver root, a new /dev tmpfs).
FOLLOWS_HOST_MOUNTS = {"/dev", "/run/nvidia"}
# The AMD GPU Operator's NodeFeatureRule (ROCm/gpu-operator,
# helm-charts-k8s/templates/gpu-nfd-default-rule.yaml, rule `amd-gpu`) labels AMD GPU nodes so.
AMD_GPU_LABEL = "feature.node.kubernetes.io/amd-gpu"


def test_the_daemonset_is_the_contract_s() -> None:
    daemonset = _one("DaemonSet")
    assert daemonset["metadata"]["name"] == "gpu-device-watcher"
    assert daemonset["metadata"]["namespace"] == "gpu-device-watcher"
    pod = _pod()
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    daemon = _container("gpu-device-watcher")
    sockets = _mount(daemon, "/run/gpu-device-watcher")
    assert _volume(sockets["name"])["hostPath"] == {
        "path": "/run/gpu-device-watcher",
        "type": "DirectoryOrCreate",
    }
    for container in (daemon, *_pod()["initContainers"]):
        context = container["securityContext"]
        assert context["privileged"] is False
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        resources = container["resources"]
        assert set(resources) == {"requests", "limits"}
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert daemon[probe]["exec"]["command"] == ["gpu-device-watcher", "status"]
        assert daemon[probe]["timeoutSeconds"] >= 2
    # The socket the probes and clients use is the one in the shared directory.
    environment = {e["name"]: e["value"] for e in daemon.get("env", [])}
    socket_path = environment.get(
        "GPU_DEVICE_WATCHER_SOCKET", "/run/gpu-device-watcher/gpu-device-watcher.sock"
    )
    assert os.path.dirname(socket_path) == "/run/gpu-device-watcher"


def test_the_daemon_is_not_root_on_its_node() -> None:
    pod = _pod()
    daemon = _container("gpu-device-watcher")
    context = {**pod["securityContext"], **daemon["securityContext"]}
    assert (context["runAsUser"], context["runAsGroup"]) == (DAEMON_UID, DAEMON_UID)
    assert context["runAsNonRoot"] is True
    assert capabilities_added(daemon) == [], "measured: the daemon needs no capability"
    # Its own PID namespace: the host init's table comes through the host's procfs.
    assert pod.get("hostPID", False) is False
    assert daemon["args"] == ["serve", "--root", "/host", "--mountinfo", "/host/proc/1/mountinfo"]


def test_of_the_host_the_daemon_sees_only_what_the_map_reads() -> None:
    daemon = _container("gpu-device-watcher")
    host_mounts = {
        _volume(m["name"])["hostPath"]["path"]: m
        for m in daemon["volumeMounts"]
        if "hostPath" in _volume(m["name"])
    }
    writable = {path for path, m in host_mounts.items() if not m.get("readOnly", False)}
    assert writable == {
        "/run/gpu-device-watcher",
        "/etc/kubernetes/node-feature-discovery/features.d",
    }
    assert set(host_mounts) - writable == HOST_READS
    for path in HOST_READS:
        assert host_mounts[path]["mountPath"] == "/host" + path
        assert host_mounts[path]["readOnly"] is True
    following = {
        p for p in HOST_READS if host_mounts[p].get("mountPropagation") == "HostToContainer"
    }
    assert following == FOLLOWS_HOST_MOUNTS


def test_the_init_steps_hold_only_the_capability_they_need() -> None:
    steps = {c["name"]: c for c in _pod()["initContainers"]}
    assert list(steps) == ["host-dirs", "install-action"]
    for step in steps.values():
        assert step["securityContext"]["runAsUser"] == 0
    assert capabilities_added(steps["host-dirs"]) == ["CHOWN"]
    assert capabilities_added(steps["install-action"]) == []
    # Each sees only the host directories it changes.
    assert {m["mountPath"] for m in steps["host-dirs"]["volumeMounts"]} == {
        "/run/gpu-device-watcher",
        "/etc/kubernetes/node-feature-discovery/features.d",
    }
    script = steps["host-dirs"]["command"][-1]
    assert f"chown {DAEMON_UID}:{DAEMON_UID} /run/gpu-device-watcher" in script


def test_the_daemonset_runs_on_nvidia_and_amd_gpu_nodes() -> None:
    pod = _pod()
    assert "nodeSelector" not in pod, "a nodeSelector ANDs its labels: one vendor only"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    # nodeSelectorTerms are ORed: a node with either label gets a pod.
    assert terms == [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}
            ]
        },
        {"matchExpressions": [{"key": AMD_GPU_LABEL, "operator": "In", "values": ["true"]}]},
    ]
    assert {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert AMD_GPU_LABEL in (BASE / "daemonset.yaml").read_text()


def test_the_network_policy_admits_only_scrapes() -> None:
    policy = _one("NetworkPolicy")["spec"]
    pod_labels = _one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["egress"] == [], "the daemon talks to nothing on the network"
    (rule,) = policy["ingress"]
    (port,) = rule["ports"]
    names = {p["name"] for p in _container("gpu-device-watcher")["ports"]}
    assert port == {"port": "metrics", "protocol": "TCP"} and "metrics" in names


def test_the_init_container_installs_the_action_on_the_host() -> None:
    init = _container("install-action", init=True)
    command = init["command"]
    assert command[:2] == ["gpu-device-watcher", "install-action"]
    target = _mount(init, command[2])
    volume = _volume(target["name"])
    assert volume["hostPath"]["path"].startswith("/")
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    assert not target.get("readOnly", False)


# -- labels and metrics -----------------------------------------------------------------


def _generated_config() -> tuple[str, Path]:
    """(the ConfigMap's name, its one file) from the base's configMapGenerator."""
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    (name,) = generator["files"]
    return generator["name"], BASE / name


def test_the_config_map_is_the_daemon_s_config_at_the_default_path(tmp_path: Path) -> None:
    name, source = _generated_config()
    daemon = _container("gpu-device-watcher")
    mount = _mount(daemon, os.path.dirname(DEFAULT_CONFIG))
    assert mount["readOnly"] is True
    assert os.path.basename(DEFAULT_CONFIG) == source.name  # the key is the file name
    volume = _volume(mount["name"])["configMap"]
    assert volume["name"] == name
    # The kubelet writes ConfigMap files owned by root with defaultMode: the daemon (its own
    # uid) must accept them under the config safety rule.
    mode = volume["defaultMode"]
    kubelet_file = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, 0, 0, 0, 0, 0, 0))
    assert config_file_problem(DEFAULT_CONFIG, kubelet_file, own_uid=DAEMON_UID) is None
    # ...and the daemon loads it: every key known and of the right type.
    copy = tmp_path / "config.toml"
    shutil.copyfile(source, copy)
    copy.chmod(mode)
    config = load_config_file(str(copy), required=True)
    assert config.metrics_listen is not None and config.nfd_features_file is not None


def test_metrics_are_served_on_the_declared_port() -> None:
    config = load_config_file(str(_generated_config()[1]), required=True)
    assert config.metrics_listen is not None
    host, port = parse_listen(config.metrics_listen)
    assert host == "0.0.0.0", "the pod IP, where Prometheus scrapes"  # noqa: S104
    daemon = _container("gpu-device-watcher")
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in daemon["ports"]
    annotations = _one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def test_the_feature_file_lands_in_the_host_s_features_d() -> None:
    config = load_config_file(str(_generated_config()[1]), required=True)
    assert config.nfd_features_file is not None
    directory = os.path.dirname(config.nfd_features_file)
    assert directory == "/etc/kubernetes/node-feature-discovery/features.d"
    mount = _mount(_container("gpu-device-watcher"), directory)
    assert not mount.get("readOnly", False)
    assert _volume(mount["name"])["hostPath"] == {"path": directory, "type": "DirectoryOrCreate"}


def test_monitoring_is_not_in_the_base() -> None:
    """ServiceMonitor and PrometheusRule need the Prometheus Operator's CRDs."""
    kinds = {doc["kind"] for doc in _resources()}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "PodMonitor"}
    assert not any(
        name.startswith("monitoring")
        for name in yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    )


def _monitoring() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "gpu-device-watcher"
    return [doc for name in kustomization["resources"] for doc in _documents(MONITORING / name)]


def test_the_service_monitor_reaches_the_pods() -> None:
    documents = _monitoring()
    service = next(doc for doc in documents if doc["kind"] == "Service")
    monitor = next(doc for doc in documents if doc["kind"] == "ServiceMonitor")
    kubernetes_validate.validate(service, VERSIONS[-1], strict=True)
    # The Service selects the pods by a label their template carries...
    pod_labels = _one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "gpu-device-watcher"}
    # ...its port is the container's `metrics` port, by name...
    (port,) = service["spec"]["ports"]
    names = {p["name"] for p in _container("gpu-device-watcher")["ports"]}
    assert port["targetPort"] in names
    # ...and the ServiceMonitor selects the Service and scrapes that port.
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["gpu-device-watcher"]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [port["name"]]


def test_the_monitoring_kustomization_renders() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    documents = [doc for doc in yaml.safe_load_all(rendered) if doc is not None]
    assert sorted(doc["kind"] for doc in documents) == [
        "PrometheusRule",
        "Service",
        "ServiceMonitor",
    ]
    assert {doc["metadata"]["namespace"] for doc in documents} == {"gpu-device-watcher"}


# -- the pod, run for real -----------------------------------------------------------------


def _sim_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root: unshare -m and -p, tmpfs and bind mounts, chroot, setpriv"
    missing = [t for t in ("unshare", "nsenter", "setpriv", "mount") if shutil.which(t) is None]
    return f"needs {', '.join(missing)}" if missing else None


def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="gdw-pod-", dir="/tmp"))


def _simulate(scratch: Path, pod: dict[str, Any], config: str = "") -> dict[str, Any]:
    """The pod as `pod` describes it, with `config` as its ConfigMap's config.toml."""
    mode = _volume(_mount(_container("gpu-device-watcher"), "/etc/gpu-device-watcher")["name"])[
        "configMap"
    ]["defaultMode"]
    spec = json.dumps({"pod": pod, "config": config, "config_mode": mode})
    done = run_scenario_module("tests.kubernetes.podsim", spec, scratch, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _base_config_on_loopback() -> str:
    """The base's config.toml, its metrics moved to loopback and a free port (the simulated
    pod shares the test's network namespace)."""
    text = _generated_config()[1].read_text()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    moved = text.replace('"0.0.0.0:9402"', f'"127.0.0.1:{port}"')
    assert moved != text
    return moved


@pytest.fixture(scope="module")
def pod_run() -> Iterator[dict[str, Any]]:
    """One run of the manifest's pod with the base's config, shared by the tests below."""
    if (problem := _sim_problem()) is not None:
        pytest.skip(problem)
    scratch = _scratch()
    try:
        yield _simulate(scratch, _pod(), _base_config_on_loopback())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.realfs
def test_the_pod_s_privileges_are_enough(pod_run: dict[str, Any]) -> None:
    result = pod_run
    assert result.get("ready"), result
    assert result["init"] == {"host-dirs": 0, "install-action": 0}, result
    log = result["log"]
    assert "Traceback" not in log, log
    # Nodes attributed to the host's mounts, by host path, through the host init's table.
    assert result["first"]["valid"], result
    assert result["first"]["mount"]["mount_point"] == "/run/nvidia/driver"
    assert result["probe"] == 0, "the readiness/liveness probe failed"
    # A nodev remount on the host, seen through the host's table (it does not propagate).
    assert result["nodev"] == ["nodev-mount"] * 4, result
    # ...which the pod's own copy of the mount never shows: why the host's table is read.
    assert result["pod_copy_options"], result
    assert all("nodev" not in options.split(",") for options in result["pod_copy_options"])
    # A later mount on the host reaches the pod (HostToContainer) and is attributed to it.
    assert result["remounted"]["mount"]["mount_point"] == DEV_ROOT
    assert result["remounted"]["valid"]
    assert result["exit"] == 0
    # The DaemonSet's memory limit leaves room over what the daemon uses.
    limit = _container("gpu-device-watcher")["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert result["usage"]["rss_mib"] * 2 < int(limit[:-2]), result["usage"]


@pytest.mark.realfs
def test_the_pod_s_config_turns_on_labels_and_metrics(pod_run: dict[str, Any]) -> None:
    """The base's config.toml, as the kubelet writes it (root-owned, defaultMode), read by the
    daemon with the pod's uid: the feature file lands in the node's features.d, owned by the
    daemon, and the metrics are served."""
    result = pod_run
    assert result.get("ready"), result
    assert result["features"] == ["gpu-device-watcher"], result
    owner = result["owners_running"]["SCRATCH/features.d/gpu-device-watcher"]
    assert owner == [DAEMON_UID, DAEMON_UID, "0o644"], result["owners_running"]
    assert "gpu_device_watcher_checkpoint_ready" in result["metrics"], result


@pytest.mark.realfs
def test_the_init_steps_hand_over_only_what_the_daemon_owns(pod_run: dict[str, Any]) -> None:
    owners = pod_run["owners"]
    assert owners["/run/gpu-device-watcher"] == [DAEMON_UID, DAEMON_UID, "0o755"], owners
    # NFD's directory stays root's: the daemon's group may add files, the sticky bit keeps
    # it from replacing or removing those of others.
    assert owners["SCRATCH/features.d"] == [0, DAEMON_UID, "0o1775"], owners
    # What CRIU runs as root stays root's, out of the daemon's reach.
    action = owners["SCRATCH/action/gpu-device-watcher-criu-action"]
    assert action[:2] == [0, 0] and int(action[2], 8) & 0o022 == 0, owners
    assert owners["SCRATCH/action"][:2] == [0, 0], owners


# Each step of the review's attack, run in the daemon's container with its privileges, and
# what must be true on the node afterwards.
ATTACKS = [
    "read-shadow",
    "read-kubelet-key",
    "write-host-run",
    "write-host-run-nvidia",
    "plant-cuda-checkpoint",
    "stop-root-process",
    "kill-root-process",
    "write-core-pattern",
]


@pytest.mark.realfs
@pytest.mark.parametrize("step", ATTACKS)
def test_a_compromised_daemon_cannot(pod_run: dict[str, Any], step: str) -> None:
    attack = pod_run["attack"]
    assert set(attack) == set(ATTACKS), attack
    assert attack[step] != "done", f"{step}: the pod could do it ({pod_run['uid']=})"
    aftermath = pod_run["aftermath"]
    if step.startswith(("write-host-run", "plant-")):
        assert aftermath["planted"] == [], aftermath
    if step.endswith("-root-process"):
        # Alive and not stopped: S (sleeping) or R.
        assert aftermath["victim"] in {"S", "R"}, aftermath


@pytest.mark.realfs
def test_without_the_init_step_the_daemon_cannot_make_its_socket() -> None:
    """Why the init step is there: the kubelet makes the hostPath root's."""
    if (problem := _sim_problem()) is not None:
        pytest.skip(problem)
    pod = _pod()
    pod["initContainers"] = [c for c in pod["initContainers"] if c["name"] != "host-dirs"]
    scratch = _scratch()
    try:
        result = _simulate(scratch, pod)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert result["init"] == {"install-action": 0}, result
    assert not result["ready"], result
    assert "cannot create socket in /run/gpu-device-watcher: Permission denied" in result["log"]
