"""Kernel uevents as a "rescan soon" hint: the families' modules and DRM render nodes.

A change under /proc alone (`rmmod nvidia_uvm`, a reload that registers another major) moves
no mount and touches no watched directory; the kernel's uevent says it happened. The source
joins the kernel's multicast group (AF_NETLINK, NETLINK_KOBJECT_UEVENT, group 1), which on
Linux needs no privilege and reaches a process in its own network namespace as long as that
namespace belongs to the initial user namespace (the shipped unit's PrivateNetwork=, a pod
without hostNetwork).

What is accepted, and why:

* Only the kernel's own format, `ACTION@DEVPATH\\0KEY=VALUE\\0...`. udev's rebroadcasts (the
  "libudev" header, group 2) are never joined: they come later, only where udevd runs (not
  in most driver containers), and a node udev makes is seen by the directory watches anyway.
* `add` and `remove` of a module named in the family table (`SUBSYSTEM=module`,
  `DEVPATH=/module/<name>`): the kernel sends `add` once the module's init has run and
  `remove` after its exit, so /proc/devices already shows the change when the rescan reads
  it. NVIDIA's driver makes no kernel device for most of its nodes, so for NVIDIA these are
  the signal.
* `add` and `remove` of a DRM render node (`SUBSYSTEM=drm`, `DEVPATH=.../renderD<N>`): an AMD
  GPU or compute partition coming or going.
* Any sender. The kernel's messages carry port id 0, but whoever holds CAP_NET_ADMIN over the
  network namespace (root on the host, a privileged container in the pod's namespace) can
  send the same bytes; the tests do exactly that, as this kernel has no loadable modules.
  Nothing is believed: a message only decides whether to rescan, never what the map says,
  and the scheduler's debounce and spacing bound what a flood of hints can cost.

The kernel sends a uevent for every device on the machine (network interfaces, block
devices, cgroups of containers starting and stopping); a classic BPF filter attached to the
socket drops every message but the ones above inside the kernel, so an unrelated flood
costs the daemon no wake-up at all. The filter is a straight program over the message's
fixed layout: the header ends at the first NUL after the action, and the kernel always
writes `ACTION=`, `DEVPATH=` and `SUBSYSTEM=` first, so `SUBSYSTEM=` starts at twice the
header's length plus 15. The same checks run again here on what the filter let through.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import re
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import anyio
from anyio.abc import TaskStatus

from watcher.sources._fdwait import FdWait

__all__ = [
    "KERNEL_GROUP",
    "NETLINK_KOBJECT_UEVENT",
    "UeventInterest",
    "UeventSource",
    "filter_program",
    "relevance",
]

log = logging.getLogger(__name__)

NETLINK_KOBJECT_UEVENT: Final = 15
# The kernel's multicast group; udev's rebroadcasts use group 2.
KERNEL_GROUP: Final = 1
# asm-generic/socket.h (x86, arm64, riscv, ppc, s390): SO_ATTACH_FILTER is 26.
SO_ATTACH_FILTER: Final = 26
# The kernel caps one uevent's environment at 2 KiB (UEVENT_BUFFER_SIZE) plus the header.
RECEIVE_BYTES: Final = 16384
# Messages taken per wake-up before the event loop gets a turn (the fd stays readable).
DRAIN_BATCH: Final = 64
# How far into a message the in-kernel filter looks for the end of the header: a DEVPATH of
# up to ~250 bytes (a render node behind four PCIe switches is ~110). Longer headers are
# dropped (no hint; the directory watches still see the node udev makes). The program must
# fit the socket's option memory (net.core.optmem_max, 20 KiB before Linux 6.9): at 256 it
# takes 17,480 bytes on 6.18, at 384 about 23,600 (ss -m, `o`).
HEADER_SCAN_BYTES: Final = 256

_ACTIONS: Final = frozenset({b"add", b"remove"})
_RENDER_NODE: Final = re.compile(rb"renderD[0-9]{1,7}")
_MODULE_PREFIX: Final = b"/module/"


@dataclass(frozen=True, slots=True)
class UeventInterest:
    """The messages that mean "rescan soon": these modules, and render nodes if asked."""

    modules: frozenset[str]
    render_nodes: bool = True

    @classmethod
    def of(cls, modules: Iterable[str], *, render_nodes: bool = True) -> UeventInterest:
        return cls(frozenset(modules), render_nodes)


def relevance(message: bytes, interest: UeventInterest) -> str | None:
    """Why a message asks for a rescan ("uevent: remove module nvidia_uvm"), or None.

    Only names checked against `interest` end up in the reason, so a hostile sender cannot
    put arbitrary text into the log.
    """
    header, _, environment = message.partition(b"\0")
    action, at, devpath = header.partition(b"@")
    if not at or action not in _ACTIONS:
        return None  # udev's "libudev" format, or an action that creates and removes nothing
    subsystem = _value(environment, b"SUBSYSTEM")
    if subsystem == b"module":
        name = devpath.removeprefix(_MODULE_PREFIX)
        if devpath.startswith(_MODULE_PREFIX) and name.decode("ascii", "replace") in (
            interest.modules
        ):
            return f"uevent: {action.decode()} module {name.decode()}"
        return None
    if subsystem == b"drm" and interest.render_nodes:
        node = devpath.rpartition(b"/")[2]
        if _RENDER_NODE.fullmatch(node):
            return f"uevent: {action.decode()} drm {node.decode()}"
    return None


def _value(environment: bytes, key: bytes) -> bytes | None:
    prefix = key + b"="
    for entry in environment.split(b"\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :]
    return None


# --- the in-kernel filter (classic BPF) ------------------------------------------------------

# linux/filter.h opcodes.
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_IMM, _ABS, _IND, _MEM = 0x00, 0x20, 0x40, 0x60
_ADD, _SUB, _AND, _LSH, _XOR = 0x00, 0x10, 0x50, 0x60, 0xA0
_JA, _JEQ = 0x00, 0x10
_K, _X = 0x00, 0x08
_TAX, _TXA = 0x00, 0x80
_ACCEPT: Final = 0xFFFFFFFF
_SIZES: Final = {4: _W, 2: _H, 1: _B}


@dataclass(slots=True)
class _Insn:
    code: int
    k: int = 0
    # Jump targets: a label, or None for the next instruction.
    jt: str | None = None
    jf: str | None = None
    # For BPF_JA: the label `k` points to.
    to: str | None = None


class _Assembler:
    """A classic BPF program with named jump targets, resolved to forward offsets."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def emit(self, code: int, k: int = 0, jt: str | None = None, jf: str | None = None) -> None:
        self._insns.append(_Insn(code, k & 0xFFFFFFFF, jt, jf))

    def jump(self, to: str) -> None:
        self._insns.append(_Insn(_JMP | _JA, to=to))

    def expect(self, data: bytes, offset: int, *, indexed: bool, otherwise: str) -> None:
        """Go on when the message holds `data` at `offset` (from X when `indexed`), else jump
        to `otherwise`."""
        mode = _IND if indexed else _ABS
        position = 0
        while position < len(data):
            width = next(size for size in (4, 2, 1) if len(data) - position >= size)
            chunk = data[position : position + width]
            self.emit(_LD | _SIZES[width] | mode, offset + position)
            self.emit(_JMP | _JEQ | _K, int.from_bytes(chunk, "big"), jf=otherwise)
            position += width

    def assemble(self) -> bytes:
        packed = bytearray()
        for index, insn in enumerate(self._insns):
            k = insn.k if insn.to is None else self._offset(index, insn.to, 0xFFFFFFFF)
            jt = 0 if insn.jt is None else self._offset(index, insn.jt, 0xFF)
            jf = 0 if insn.jf is None else self._offset(index, insn.jf, 0xFF)
            packed += struct.pack("=HBBI", insn.code, jt, jf, k)
        return bytes(packed)

    def _offset(self, index: int, label: str, limit: int) -> int:
        distance = self._labels[label] - index - 1
        if not 0 <= distance <= limit:
            raise ValueError(f"jump to {label!r} out of reach ({distance})")
        return distance


def filter_program(interest: UeventInterest) -> bytes:
    """The socket filter that passes what `relevance` may accept, as packed `sock_filter`s.

    In order: the action (add or remove), the end of the header, the subsystem (module or
    drm), then a module's name or a render node's device path; anything else is dropped."""
    asm = _Assembler()
    _match_action(asm)
    _find_header_end(asm)
    _match_subsystem(asm, interest)
    _match_module(asm, interest)
    _match_render_node(asm)
    return asm.assemble()


def _match_action(asm: _Assembler) -> None:
    # The action: "add@" (DEVPATH at 4) or "remove@" (DEVPATH at 7), kept in M[1].
    asm.emit(_LD | _W | _ABS, 0)
    asm.emit(_JMP | _JEQ | _K, int.from_bytes(b"add@", "big"), jt="add")
    asm.expect(b"remove@", 0, indexed=False, otherwise="other_action")
    asm.emit(_LD | _IMM, 7)
    asm.emit(_ST, 1)
    asm.jump("scan")
    # Conditional jumps reach 255 instructions at most: this one drops near the start.
    asm.label("other_action")
    asm.emit(_RET | _K, 0)
    asm.label("add")
    asm.emit(_LD | _IMM, 4)
    asm.emit(_ST, 1)


def _find_header_end(asm: _Assembler) -> None:
    # The end of the header: the first word from offset 4 holding a zero byte
    # ((v - 0x01010101) & ~v & 0x80808080 is non-zero exactly then), then the byte in it.
    asm.label("scan")
    for word in range(4, 4 + HEADER_SCAN_BYTES, 4):
        asm.emit(_LD | _W | _ABS, word)
        asm.emit(_ST, 2)
        asm.emit(_ALU | _XOR | _K, 0xFFFFFFFF)
        asm.emit(_MISC | _TAX)
        # Scratch memory, not the message again: a message load costs the kernel more.
        asm.emit(_LD | _MEM, 2)
        asm.emit(_ALU | _SUB | _K, 0x01010101)
        asm.emit(_ALU | _AND | _X)
        asm.emit(_ALU | _AND | _K, 0x80808080)
        asm.emit(_JMP | _JEQ | _K, 0, jt=f"word{word + 4}")
        asm.emit(_LDX | _IMM, word)
        asm.jump("zero_in_word")
        asm.label(f"word{word + 4}")
    asm.jump("drop")
    asm.label("zero_in_word")
    for byte in range(3):
        asm.emit(_LD | _B | _IND, byte)
        asm.emit(_JMP | _JEQ | _K, 0, jt=f"nul{byte}")
    asm.emit(_MISC | _TXA)
    asm.emit(_ALU | _ADD | _K, 4)
    asm.jump("header_length")
    for byte in range(3):
        asm.label(f"nul{byte}")
        asm.emit(_MISC | _TXA)
        asm.emit(_ALU | _ADD | _K, byte + 1)
        if byte < 2:
            asm.jump("header_length")


def _match_subsystem(asm: _Assembler, interest: UeventInterest) -> None:
    # A = the header's length, kept in M[0]; SUBSYSTEM= follows ACTION= and DEVPATH=.
    asm.label("header_length")
    asm.emit(_ST, 0)
    asm.emit(_ALU | _LSH | _K, 1)
    asm.emit(_ALU | _ADD | _K, 15)
    asm.emit(_MISC | _TAX)
    # Every conditional jump stays local (they reach 255 instructions forward at most), so
    # the program grows with the module list without breaking: the far ones are BPF_JA.
    asm.expect(b"SUBSYSTEM=", 0, indexed=True, otherwise="other_subsystem")
    asm.emit(_LD | _W | _IND, 10)
    if interest.render_nodes:
        asm.emit(_JMP | _JEQ | _K, int.from_bytes(b"drm\0", "big"), jf="not_drm")
        asm.jump("drm")
        asm.label("not_drm")
    asm.expect(b"module\0", 10, indexed=True, otherwise="other_subsystem")
    asm.jump("module")
    asm.label("other_subsystem")
    asm.emit(_RET | _K, 0)


def _match_module(asm: _Assembler, interest: UeventInterest) -> None:
    # DEVPATH is /module/<name>: one of the family table's names, NUL-terminated.
    asm.label("module")
    asm.emit(_LD | _MEM, 1)
    asm.emit(_MISC | _TAX)
    asm.expect(_MODULE_PREFIX, 0, indexed=True, otherwise="other_module")
    asm.jump("names")
    asm.label("other_module")
    asm.emit(_RET | _K, 0)
    asm.label("names")
    for number, name in enumerate(sorted(interest.modules)):
        asm.expect(name.encode() + b"\0", len(_MODULE_PREFIX), indexed=True, otherwise=f"m{number}")
        asm.emit(_RET | _K, _ACCEPT)
        asm.label(f"m{number}")
    asm.emit(_RET | _K, 0)


def _match_render_node(asm: _Assembler) -> None:
    # A render node: the header ends in "/renderD" and 1 to 7 digits (checked here again).
    asm.label("drm")
    for digits in range(1, 8):
        asm.emit(_LD | _MEM, 0)
        asm.emit(_ALU | _SUB | _K, 1 + digits + len(b"/renderD"))
        asm.emit(_MISC | _TAX)
        asm.expect(b"/renderD", 0, indexed=True, otherwise=f"d{digits}")
        asm.emit(_RET | _K, _ACCEPT)
        asm.label(f"d{digits}")
    asm.label("drop")
    asm.emit(_RET | _K, 0)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def attach_filter(sock: socket.socket, program: bytes) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program, so the buffer may go afterwards."""
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))


def subscribe(interest: UeventInterest) -> socket.socket:
    """A non-blocking socket on the kernel's uevent group with the filter attached."""
    sock = socket.socket(
        socket.AF_NETLINK,
        socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
        NETLINK_KOBJECT_UEVENT,
    )
    try:
        # Filter first: nothing unfiltered is queued in between.
        attach_filter(sock, filter_program(interest))
        sock.bind((0, KERNEL_GROUP))
    except BaseException:
        sock.close()
        raise
    return sock


class UeventSource:
    """Calls `on_change` for each uevent that asks for a rescan, or never where the kernel
    or the sandbox has no uevent socket (said once in the log).

    `sock`: read from this instead of subscribing (a test's socketpair with scripted
    messages; the in-kernel filter is then not in the way, the same checks run here).
    """

    def __init__(self, interest: UeventInterest, *, sock: socket.socket | None = None) -> None:
        self.interest = interest
        self._fd_wait = FdWait()
        self._socket = sock
        if sock is None:
            try:
                self._socket = subscribe(interest)
            except OSError as error:
                # EAFNOSUPPORT: RestrictAddressFamilies= without AF_NETLINK, or no netlink;
                # EPERM: a seccomp filter; ENOMEM: the filter over net.core.optmem_max.
                log.warning(
                    "kernel uevents are unavailable (%s): module loads and unloads are seen "
                    "only at the next other event or rescan",
                    error.strerror or error,
                )
        else:
            sock.setblocking(False)

    @property
    def available(self) -> bool:
        return self._socket is not None

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report every relevant uevent until cancelled or closed; `started()` once listening."""
        task_status.started()
        sock = self._socket
        if sock is None:
            await anyio.sleep_forever()
            return
        while self._socket is sock and await self._fd_wait.readable(sock.fileno()):
            for reason in self._drain(sock):
                on_change(reason)

    def _drain(self, sock: socket.socket) -> list[str]:
        reasons: list[str] = []
        for _ in range(DRAIN_BATCH):
            try:
                message = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                break
            except OSError as error:
                if error.errno != errno.ENOBUFS:
                    raise
                # The receive queue overflowed: what was lost may have mattered.
                reasons.append("uevent: messages lost (receive queue overflowed)")
                continue
            reason = relevance(message, self.interest)
            if reason is not None:
                reasons.append(reason)
        return reasons

    def close(self) -> None:
        """Release the socket; a `run()` waiting on it returns. Safe to call twice."""
        sock, self._socket = self._socket, None
        if sock is None:
            return
        self._fd_wait.closing(sock.fileno())
        sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
