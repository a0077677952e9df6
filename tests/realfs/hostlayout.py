"""Build a real host tree in a private mount namespace and run `watcher.probe.scan` on it.

The test process describes the layout with a small builder; `HostLayout.scan()` hands the
description to a child, `unshare --mount --propagation private python hostlayout.py`, which
mounts a tmpfs on the work directory (everything it writes lives there), a tmpfs on the view's
root, applies the steps in order (mounts, mknod, symlinks, files), writes the fake `/proc`
files, scans with `--mountinfo /proc/self/mountinfo` of that namespace, and prints the map as
JSON. When the child exits its namespace and every mount in it are gone: the test process
never changes its own namespace and leaves nothing mounted.

Paths given to the builder are host paths (inside the view's root) unless named `fs_*`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from tests.support.host import (
    DRIVER_VERSION,
    GPU_UUID,
    H200,
    MS_PRIVATE,
    MS_REC,
    FakeHost,
    information_text,
    mount,
    proc_devices_text,
    version_text,
)
from tests.support.processes import PRIVATE_MOUNTS, child_env
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import MountTable, parse_mountinfo

DEFAULT_TIMEOUT = 60.0


class ScanResult(msgspec.Struct, frozen=True):
    map: DeviceMap
    mountinfo: str

    def mounts(self) -> MountTable:
        return parse_mountinfo(self.mountinfo)


class LayoutError(RuntimeError):
    pass


class HostLayout:
    """A host tree to build under `workdir` (which must exist and be empty)."""

    def __init__(self, workdir: Path, *, root_name: str = "root") -> None:
        self.workdir = workdir
        self.root = workdir / root_name
        self.proc = workdir / "proc"
        # The fake sysfs (--sys), outside the root as /sys is not under --root.
        self.sys = workdir / "sys"
        self.sys_steps: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.proc_files: dict[str, str] = {}
        self.driver_roots: list[str] | None = None
        self.validations_dir = "/run/nvidia/validations"
        self.view_root: Path | None = None

    # ------------------------------------------------------------ filesystem steps
    # Each step is a `tests.support.host.FakeHost` command whose `path` is a host path
    # (`where` "root"), a path in the fake sysfs ("sys") or a path as the child sees it ("fs").

    def _step(self, op: str, where: str = "root", **arguments: Any) -> HostLayout:
        (self.sys_steps if where == "sys" else self.steps).append(
            {"op": op, "where": where, **arguments}
        )
        return self

    def mount(
        self, fstype: str, path: str, *, source: str | None = None, options: str = ""
    ) -> HostLayout:
        return self._step(
            "mount", fstype=fstype, source=source or fstype, path=path, options=options
        )

    def tmpfs(self, path: str, *, options: str = "", source: str = "tmpfs") -> HostLayout:
        return self.mount("tmpfs", path, source=source, options=options)

    def bind_file(self, path: str, text: str = "") -> HostLayout:
        """Bind a file kept in the work directory (outside the root) over `path`."""
        staging = str(self.workdir / f"bind-source-{len(self.steps)}")
        return self._step("bind_file", path=path, text=text, staging=staging)

    def mkdir(self, path: str) -> HostLayout:
        return self._step("mkdir", path=path)

    def node(
        self, path: str, major: int, minor: int, *, mode: int = 0o666, block: bool = False
    ) -> HostLayout:
        return self._step("mknod", path=path, major=major, minor=minor, mode=mode, block=block)

    def symlink(self, path: str, target: str) -> HostLayout:
        return self._step("symlink", path=path, target=target)

    def file(self, path: str, text: str) -> HostLayout:
        return self._step("write", path=path, text=text, atomic=False)

    def fs_symlink(self, fs_path: Path, target: Path) -> HostLayout:
        """A symlink anywhere in the work directory (for a --root reached through a link)."""
        return self._step("symlink", "fs", path=str(fs_path), target=str(target))

    # ------------------------------------------------------------ the fake /sys

    def sys_file(self, relative: str, text: str) -> HostLayout:
        return self._step("write", "sys", path=relative, text=text, atomic=False)

    def sys_fifo(self, relative: str) -> HostLayout:
        return self._step("fifo", "sys", path=relative)

    def sys_mkdir(self, relative: str) -> HostLayout:
        return self._step("mkdir", "sys", path=relative)

    def sys_link(self, relative: str, target: str) -> HostLayout:
        """A symlink at `relative` written as sysfs writes them: relative to its directory
        when `target` is a path inside /sys (no leading /), else as given (`/...`)."""
        return self._step("sys_link", "sys", relative=relative, target=target)

    def drm_render(
        self,
        minor: int,
        bus_id: str,
        *,
        bridge: str = "pci0000:80/0000:80:01.1",
        **attributes: str | None,
    ) -> HostLayout:
        """A render node's sysfs, shaped as the kernel makes it: `tests.support.host.drm_render`
        (`driver`, `product_name`, `unique_id`), with its `dev` file."""
        return self._step(
            "drm_render",
            "sys",
            minor=minor,
            bus_id=bus_id,
            bridge=bridge,
            dev_file=True,
            **attributes,
        )

    def partitioned_gpu(self, **options: Any) -> HostLayout:
        """An MI300-class GPU in compute partitions (`tests.support.host.partitioned_gpu`)."""
        return self._step("partitioned_gpu", "sys", **options)

    # ------------------------------------------------------------ /proc and GPU Operator files

    def proc_devices(
        self, char: Mapping[str, int], block: Mapping[str, int] | None = None
    ) -> HostLayout:
        return self.proc_text("devices", proc_devices_text(char, block))

    def proc_text(self, relative: str, text: str) -> HostLayout:
        self.proc_files[relative] = text
        return self

    def driver_version(self, version: str = DRIVER_VERSION) -> HostLayout:
        return self.proc_text("driver/nvidia/version", version_text(version))

    def gpu(
        self, bus_id: str, minor: int, *, model: str = H200, uuid: str = GPU_UUID
    ) -> HostLayout:
        return self.proc_text(
            f"driver/nvidia/gpus/{bus_id}/information",
            information_text(bus_id, minor, model=model, uuid=uuid),
        )

    def driver_ready(self, text: str) -> HostLayout:
        return self.file(f"{self.validations_dir}/driver-ready", text)

    def config_roots(self, *roots: str) -> HostLayout:
        self.driver_roots = list(roots)
        return self

    def through(self, view_root: Path) -> HostLayout:
        """Scan with --root set to `view_root` (e.g. a symlink to the real root)."""
        self.view_root = view_root
        return self

    # ------------------------------------------------------------ running it

    def spec(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "root": str(self.root),
            "view_root": str(self.view_root or self.root),
            "proc": str(self.proc),
            "sys": str(self.sys),
            "sys_steps": self.sys_steps,
            "steps": self.steps,
            "proc_files": self.proc_files,
            "driver_roots": self.driver_roots,
            "validations_dir": self.validations_dir,
        }

    def scan(self, timeout: float = DEFAULT_TIMEOUT) -> ScanResult:
        env = child_env()
        done = subprocess.run(
            [*PRIVATE_MOUNTS, sys.executable, str(Path(__file__).resolve())],
            input=json.dumps(self.spec()).encode(),
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise LayoutError(
                f"layout child exited {done.returncode}: {done.stderr.decode(errors='replace')}"
            )
        return msgspec.json.decode(done.stdout, type=ScanResult)


# ---------------------------------------------------------------- the child side


def _run(host: FakeHost, step: dict[str, Any]) -> None:
    command = dict(step)
    where = command.pop("where")
    if "path" in command and where != "fs":
        base = host.root if where == "root" else host.sys
        command["path"] = str(base / command["path"].lstrip("/"))
    host.execute(command)


def _child(spec: dict[str, Any]) -> bytes:
    from watcher.core.snapshot import DEFAULT_DRIVER_ROOTS, HostView
    from watcher.probe import scan

    workdir, root, proc = spec["workdir"], spec["root"], spec["proc"]
    host = FakeHost(Path(root), Path(proc), Path(spec["sys"]))
    # Belt and braces: unshare(1) already made every mount private in this namespace.
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    host.tmpfs(Path(workdir), source="gdw-work")
    host.tmpfs(host.root)
    for step in spec["steps"]:
        _run(host, step)
    for relative, text in spec["proc_files"].items():
        host.proc_text(relative, text, atomic=False)
    host.mkdir(host.proc)
    host.mkdir(host.sys)
    for step in spec["sys_steps"]:
        _run(host, step)
    configured = spec["driver_roots"] is not None
    view = HostView(
        root=spec["view_root"],
        proc=proc,
        mountinfo="/proc/self/mountinfo",
        driver_roots=tuple(spec["driver_roots"]) if configured else DEFAULT_DRIVER_ROOTS,
        driver_roots_configured=configured,
        validations_dir=spec["validations_dir"],
        sys=spec["sys"],
    )
    device_map = scan(view)
    with open("/proc/self/mountinfo", encoding="utf-8", newline="\n") as file:
        mountinfo = file.read()
    return msgspec.json.encode(ScanResult(map=device_map, mountinfo=mountinfo))


if __name__ == "__main__":
    sys.stdout.buffer.write(_child(json.loads(sys.stdin.buffer.read())))
