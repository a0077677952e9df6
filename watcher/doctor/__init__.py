"""`gpu-device-watcher doctor`: is this node ready for GPU checkpoints, end to end, and what
exactly to fix.

Gathering (`host`, `services`, and each group's `gather_*`) reads the host under `--root` and
asks the daemon; the checks (`node`, `criu`, `cuda`, `runtimes`: `check_*`) are pure functions
of what was gathered; `report` prints them. Nothing here writes to the host.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from watcher import client
from watcher.doctor.model import CHECK_IDS, Check, exit_code, summary
from watcher.errors import ServerError, Unreachable

__all__ = ["CHECK_IDS", "Check", "diagnose", "exit_code", "summary"]


def _daemon(socket: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(status, map, why not) from the daemon."""
    try:
        status = client.request(socket, {"op": "status"})["status"]
        device_map = client.request(socket, {"op": "get"})["map"]
    except Unreachable as error:
        # The error's own text goes on to say how to start one; the check's fix says that.
        reason = str(error).split(" (is `", 1)[0]
        return None, None, reason.removeprefix(f"cannot reach the daemon at {socket}: ")
    except ServerError as error:
        return None, None, f"it refused: {error.code}: {error}"
    return status, device_map, None


def diagnose(
    settings: Any, environ: dict[str, str] | None = None, *, ask_daemon: bool = True
) -> list[Check]:
    """Every check, in the contract's order, for the host `settings.view` describes.

    `ask_daemon` False: the map is a direct scan and the daemon is not asked (its map is of
    its own host view, which need not be the one given)."""
    import msgspec  # noqa: PLC0415

    from watcher.core.model import DeviceMap  # noqa: PLC0415
    from watcher.doctor import criu, cuda, node, runtimes  # noqa: PLC0415
    from watcher.doctor.host import DEFAULT_PATH, HostTree  # noqa: PLC0415
    from watcher.doctor.services import read_service  # noqa: PLC0415
    from watcher.probe import scan  # noqa: PLC0415
    from watcher.publish.labels import compute_labels  # noqa: PLC0415

    environ = dict(os.environ) if environ is None else environ
    if ask_daemon:
        status, device_map, unreachable = _daemon(settings.socket)
    else:
        status, device_map, unreachable = None, None, None
    from_daemon = device_map is not None
    if device_map is None:
        device_map = msgspec.to_builtins(scan(settings.view, generation=0))
    nvidia, amd = node.families_present(device_map)
    driver = device_map.get("driver") or {}

    host = HostTree(settings.view.root)
    # Plain `criu` is typed at a shell: this one's PATH on this host, root's usual PATH on a
    # host seen from elsewhere. The services' CRIU inherits the PATH their units give them.
    plain_path = environ.get("PATH", DEFAULT_PATH) if host.is_own_root else DEFAULT_PATH
    services = {name: read_service(host, name) for name in ("containerd", "crio")}
    paths = {"criu": plain_path}
    paths.update({name: s.path_env for name, s in services.items() if s.unit is not None})

    runtime_names = tuple(
        name for name in ("runc", "crun") if any(host.which(name, p) for p in paths.values())
    )
    callers = ("criu", *runtime_names)
    every_path = list(dict.fromkeys(paths.values()))
    # The tools' probes (each a process of its own) run side by side; the rest is reading.
    with ThreadPoolExecutor(max_workers=6) as pool:
        criu_future = pool.submit(
            criu.gather_criu, host, paths, nvidia=nvidia, amd=amd, runtimes=runtime_names
        )
        cuda_future = pool.submit(
            cuda.gather_cuda,
            host,
            paths,
            nvidia=nvidia,
            driver_version=driver.get("version"),
            map_cuda_checkpoint=driver.get("cuda_checkpoint"),
        )
        runtime_futures = {
            name: pool.submit(
                runtimes.gather_runtime, host, name, every_path, service=services.get(name)
            )
            for name in ("runc", "crun", "crio", "containerd")
        }
        config_facts = criu.gather_config(host, callers)
        criu_facts = criu_future.result()
        cuda_facts = cuda_future.result()
        found = {name: future.result() for name, future in runtime_futures.items()}
    plugin_facts = criu.gather_plugins(
        host, criu_facts, config_facts, nvidia=nvidia, amd=amd, dev_root=driver.get("dev_root")
    )
    runc, crun = (
        replace(found[name], criu_version=criu_facts.version, config=config_facts)
        for name in ("runc", "crun")
    )
    crio, containerd = found["crio"], found["containerd"]

    # The feature file is where the daemon writes it, in the daemon's own view (the pod
    # mounts the host's features.d at the same path): not under --root.
    features_file = settings.nfd_features_file
    written = why = None
    if features_file is not None:
        text, why = HostTree("/").read_text(features_file, limit=64 * 1024)
        written = node.parse_feature_file(text) if text is not None else None
    try:
        expected = compute_labels(msgspec.convert(device_map, DeviceMap))
    except msgspec.ValidationError as error:
        expected, why = None, f"the map is not one this version reads ({error})"
    labels = node.LabelFacts(features_file, written, why, expected)

    return [
        node.check_daemon(node.DaemonFacts(settings.socket, status, unreachable)),
        node.check_map(
            device_map, from_daemon=from_daemon, nvidiactl_in_dev=host.exists("/dev/nvidiactl")
        ),
        criu.check_criu(criu_facts),
        criu.check_criu_config(config_facts),
        criu.check_criu_plugin(plugin_facts),
        cuda.check_cuda_checkpoint(cuda_facts),
        runtimes.check_runc(runc),
        runtimes.check_crun(crun),
        runtimes.check_crio(crio),
        runtimes.check_containerd(containerd),
        node.check_labels(labels),
    ]
