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
import os
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from tests.support.processes import PRIVATE_MOUNTS, child_env
from watcher.core.model import DeviceMap
from watcher.core.mountinfo import MountTable, parse_mountinfo

DEFAULT_TIMEOUT = 60.0
_MOUNT_TIMEOUT = 10.0


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

    def mount(
        self, fstype: str, path: str, *, source: str | None = None, options: str = ""
    ) -> HostLayout:
        self.steps.append(
            {
                "op": "mount",
                "fstype": fstype,
                "source": source or fstype,
                "path": path,
                "options": options,
            }
        )
        return self

    def tmpfs(self, path: str, *, options: str = "", source: str = "tmpfs") -> HostLayout:
        return self.mount("tmpfs", path, source=source, options=options)

    def bind_file(self, path: str, text: str = "") -> HostLayout:
        """Bind a file kept in the work directory (outside the root) over `path`."""
        self.steps.append({"op": "bind_file", "path": path, "text": text})
        return self

    def mkdir(self, path: str) -> HostLayout:
        self.steps.append({"op": "mkdir", "path": path})
        return self

    def node(
        self, path: str, major: int, minor: int, *, mode: int = 0o666, block: bool = False
    ) -> HostLayout:
        self.steps.append(
            {
                "op": "node",
                "path": path,
                "major": major,
                "minor": minor,
                "mode": mode,
                "block": block,
            }
        )
        return self

    def symlink(self, path: str, target: str) -> HostLayout:
        self.steps.append({"op": "symlink", "path": path, "target": target})
        return self

    def file(self, path: str, text: str) -> HostLayout:
        self.steps.append({"op": "file", "path": path, "text": text})
        return self

    def fs_symlink(self, fs_path: Path, target: Path) -> HostLayout:
        """A symlink anywhere in the work directory (for a --root reached through a link)."""
        self.steps.append({"op": "fs_symlink", "fs_path": str(fs_path), "target": str(target)})
        return self

    # ------------------------------------------------------------ the fake /sys

    def sys_file(self, relative: str, text: str) -> HostLayout:
        self.sys_steps.append({"op": "file", "path": relative, "text": text})
        return self

    def sys_fifo(self, relative: str) -> HostLayout:
        self.sys_steps.append({"op": "fifo", "path": relative})
        return self

    def sys_mkdir(self, relative: str) -> HostLayout:
        self.sys_steps.append({"op": "mkdir", "path": relative})
        return self

    def sys_link(self, relative: str, target: str) -> HostLayout:
        """A symlink at `relative` written as sysfs writes them: relative to its directory
        when `target` is a path inside /sys (no leading /), else as given (`/...`)."""
        self.sys_steps.append({"op": "link", "path": relative, "target": target})
        return self

    def drm_render(
        self,
        minor: int,
        bus_id: str,
        *,
        driver: str = "amdgpu",
        product_name: str | None = None,
        unique_id: str | None = None,
        bridge: str = "pci0000:80/0000:80:01.1",
    ) -> HostLayout:
        """A render node's sysfs, shaped as the kernel makes it: class/drm/renderDN is a link
        to devices/<bridge>/<bus>/drm/renderDN, whose `device` links to the PCI device,
        whose `driver` links to bus/pci/drivers/<driver>."""
        device = f"devices/{bridge}/{bus_id}"
        node = f"{device}/drm/renderD{minor}"
        self.sys_mkdir(node).sys_file(f"{node}/dev", f"226:{minor}\n")
        self.sys_mkdir(f"bus/pci/drivers/{driver}")
        self.sys_link(f"class/drm/renderD{minor}", node)
        self.sys_link(f"{node}/device", device)
        self.sys_link(f"{device}/driver", f"bus/pci/drivers/{driver}")
        if product_name is not None:
            self.sys_file(f"{device}/product_name", product_name + "\n")
        if unique_id is not None:
            self.sys_file(f"{device}/unique_id", unique_id + "\n")
        return self

    # ------------------------------------------------------------ /proc and GPU Operator files

    def proc_devices(
        self, char: Mapping[str, int], block: Mapping[str, int] | None = None
    ) -> HostLayout:
        lines = ["Character devices:", "  1 mem", "  5 /dev/tty", " 10 misc"]
        lines += [f"{major:3d} {name}" for name, major in char.items()]
        lines += ["", "Block devices:", "  8 sd", "259 blkext"]
        lines += [f"{major:3d} {name}" for name, major in (block or {}).items()]
        return self.proc_text("devices", "\n".join(lines) + "\n")

    def proc_text(self, relative: str, text: str) -> HostLayout:
        self.proc_files[relative] = text
        return self

    def driver_version(self, version: str = "580.95.05") -> HostLayout:
        return self.proc_text(
            "driver/nvidia/version",
            f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {version}  Release Build  "
            "(dvs-builder@U22-I3-AF03-09-1)  Thu Sep 25 01:23:45 UTC 2025\n"
            "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04) \n",
        )

    def gpu(
        self,
        bus_id: str,
        minor: int,
        *,
        model: str = "NVIDIA H200",
        uuid: str = "GPU-7a1c3f2e-58b4-9d0e-1f23-4a5b6c7d8e9f",
    ) -> HostLayout:
        return self.proc_text(
            f"driver/nvidia/gpus/{bus_id}/information",
            f"Model: \t\t {model}\nIRQ:   \t\t 156\nGPU UUID: \t {uuid}\n"
            "Video BIOS: \t 96.00.89.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n"
            f"DMA Mask: \t 0xfffffffffffff\nBus Location: \t {bus_id}\nDevice Minor: \t {minor}\n"
            "GPU Firmware: \t 580.95.05\nGPU Excluded:\t No\n",
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


def _run_mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, timeout=_MOUNT_TIMEOUT, capture_output=True)


def _under(root: str, host_path: str) -> str:
    return root.rstrip("/") + "/" + host_path.lstrip("/")


def _apply(root: str, workdir: str, step: dict[str, Any], number: int) -> None:
    op = step["op"]
    if op == "fs_symlink":
        os.symlink(step["target"], step["fs_path"])
        return
    path = _under(root, step["path"])
    if op == "mkdir":
        os.makedirs(path, exist_ok=True)
    elif op == "mount":
        os.makedirs(path, exist_ok=True)
        options = ["-o", step["options"]] if step["options"] else []
        _run_mount(["-t", step["fstype"], *options, step["source"], path])
    elif op == "bind_file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        outside = os.path.join(workdir, f"bind-source-{number}")
        Path(outside).write_text(step["text"])
        Path(path).touch()
        _run_mount(["--bind", outside, path])
    elif op == "node":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        kind = stat.S_IFBLK if step["block"] else stat.S_IFCHR
        os.mknod(path, kind | step["mode"], os.makedev(step["major"], step["minor"]))
        os.chmod(path, step["mode"])  # mknod is subject to the umask
    elif op == "symlink":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(step["target"], path)
    elif op == "file":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Path(path).write_text(step["text"])
    else:
        raise ValueError(f"unknown step {op!r}")


def _apply_sys(sys_root: str, step: dict[str, Any]) -> None:
    path = os.path.join(sys_root, step["path"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if step["op"] == "mkdir":
        os.makedirs(path, exist_ok=True)
    elif step["op"] == "file":
        Path(path).write_text(step["text"])
    elif step["op"] == "fifo":
        os.mkfifo(path)
    elif step["op"] == "link":
        target = step["target"]
        if not target.startswith("/"):
            target = os.path.relpath(os.path.join(sys_root, target), os.path.dirname(path))
        os.symlink(target, path)
    else:
        raise ValueError(f"unknown sys step {step['op']!r}")


def _child(spec: dict[str, Any]) -> bytes:
    from watcher.core.scan import DEFAULT_DRIVER_ROOTS, HostView
    from watcher.probe import scan

    workdir, root, proc = spec["workdir"], spec["root"], spec["proc"]
    # Belt and braces: unshare(1) already made every mount private in this namespace.
    _run_mount(["--make-rprivate", "/"])
    _run_mount(["-t", "tmpfs", "-o", "mode=755", "gdw-work", workdir])
    os.makedirs(root)
    _run_mount(["-t", "tmpfs", "-o", "mode=755", "tmpfs", root])
    for number, step in enumerate(spec["steps"]):
        _apply(root, workdir, step, number)
    for relative, text in spec["proc_files"].items():
        target = Path(proc, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    os.makedirs(proc, exist_ok=True)
    os.makedirs(spec["sys"], exist_ok=True)
    for step in spec["sys_steps"]:
        _apply_sys(spec["sys"], step)
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
