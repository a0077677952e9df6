"""watcher.core.mountinfo: parsing real and constructed tables, escapes, errors, resolve()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watcher.core.mountinfo import (
    MountEntry,
    MountinfoError,
    MountTable,
    escape,
    parse_line,
    parse_mountinfo,
    unescape,
)

from ._fixtures import fixture_text

CRIU_2509 = "mountinfo/criu-2509-gpu-operator.mountinfo"
SANDBOX = "mountinfo/sandbox-host.mountinfo"
ESCAPES = "mountinfo/escapes.mountinfo"
OPTIONAL = "mountinfo/optional-fields.mountinfo"
MALFORMED = "mountinfo/malformed.mountinfo"


def table(name: str) -> MountTable:
    return parse_mountinfo(fixture_text(name))


def by_id(mounts: MountTable, mount_id: int) -> MountEntry:
    (entry,) = [entry for entry in mounts.entries if entry.id == mount_id]
    return entry


def synthetic(*lines: str) -> MountTable:
    """A table from short `ID|PARENT|MOUNT_POINT[|OPTIONS]` specs (mount points escaped here)."""
    rows = []
    for spec in lines:
        mount_id, parent_id, mount_point, *options = spec.split("|")
        rows.append(
            f"{mount_id} {parent_id} 0:{mount_id} / {escape(mount_point)} "
            f"{options[0] if options else 'rw'} - tmpfs tmpfs rw"
        )
    mounts = parse_mountinfo("\n".join(rows))
    assert mounts.errors == []
    return mounts


def resolved_id(mounts: MountTable, path: str) -> int | None:
    entry = mounts.resolve(path)
    return entry.id if entry is not None else None


# ---------------------------------------------------------------- whole fixture tables


@pytest.mark.parametrize(
    ("name", "count"),
    [(CRIU_2509, 19), (SANDBOX, 20), (ESCAPES, 11), (OPTIONAL, 7)],
)
def test_fixture_tables_parse_without_errors(name: str, count: int) -> None:
    mounts = table(name)
    assert mounts.errors == []
    assert len(mounts.entries) == count
    assert len({entry.id for entry in mounts.entries}) == count


# ---------------------------------------------------------------- CRIU issue 2509 table


@pytest.mark.parametrize(
    ("mount_id", "expected"),
    [
        (
            614,
            MountEntry(
                id=614,
                parent_id=612,
                major=0,
                minor=516,
                root="/",
                mount_point="/run/nvidia/driver/dev",
                options=("rw", "nosuid"),
                optional=("shared:303",),
                fstype="tmpfs",
                source="tmpfs",
                super_options=("rw", "size=65536k", "mode=755", "inode64"),
            ),
        ),
        (
            615,
            MountEntry(
                id=615,
                parent_id=614,
                major=0,
                minor=517,
                root="/",
                mount_point="/run/nvidia/driver/dev/pts",
                options=("rw", "nosuid", "noexec", "relatime"),
                optional=("shared:304",),
                fstype="devpts",
                source="devpts",
                super_options=("rw", "gid=5", "mode=620", "ptmxmode=666"),
            ),
        ),
        (
            616,
            MountEntry(
                id=616,
                parent_id=614,
                major=0,
                minor=518,
                root="/",
                mount_point="/run/nvidia/driver/dev/mqueue",
                options=("rw", "nosuid", "nodev", "noexec", "relatime"),
                optional=("shared:305",),
                fstype="mqueue",
                source="mqueue",
                super_options=("rw",),
            ),
        ),
        (
            617,
            MountEntry(
                id=617,
                parent_id=614,
                major=0,
                minor=23,
                root="/systemd/journal/dev-log",
                mount_point="/run/nvidia/driver/dev/log",
                options=("rw", "nosuid", "nodev", "noexec", "relatime"),
                optional=("shared:5",),
                fstype="tmpfs",
                source="tmpfs",
                super_options=("rw", "size=158496212k", "mode=755", "inode64"),
            ),
        ),
        (
            618,
            MountEntry(
                id=618,
                parent_id=614,
                major=9,
                minor=127,
                root="/kubelet/pods/4f6e2a1c-9d3b-4e8f-a7c2-5b1d0e9f3a6c/containers/"
                "nvidia-driver-ctr/0a1b2c3d",
                mount_point="/run/nvidia/driver/dev/termination-log",
                options=("rw", "relatime"),
                optional=("shared:30",),
                fstype="ext4",
                source="/dev/md127",
                super_options=("rw", "discard", "quota", "usrquota", "stripe=1024"),
            ),
        ),
        (
            619,
            MountEntry(
                id=619,
                parent_id=614,
                major=0,
                minor=501,
                root="/",
                mount_point="/run/nvidia/driver/dev/shm",
                options=("rw", "nosuid", "nodev", "noexec", "relatime"),
                optional=("shared:280",),
                fstype="tmpfs",
                source="shm",
                super_options=("rw", "size=65536k", "inode64"),
            ),
        ),
    ],
)
def test_criu_2509_driver_dev_mounts(mount_id: int, expected: MountEntry) -> None:
    assert by_id(table(CRIU_2509), mount_id) == expected


def test_criu_2509_overlay_root_has_two_optional_fields() -> None:
    overlay = by_id(table(CRIU_2509), 612)
    assert overlay.mount_point == "/run/nvidia/driver"
    assert overlay.optional == ("shared:301", "master:1")
    assert overlay.fstype == "overlay"
    assert overlay.super_options[0] == "rw"
    assert overlay.super_options[1].startswith("lowerdir=/var/lib/containerd/")


@pytest.mark.parametrize(
    ("path", "mount_id", "nodev"),
    [
        ("/run/nvidia/driver/dev/nvidiactl", 614, False),
        ("/run/nvidia/driver/dev/nvidia-caps/nvidia-cap1", 614, False),
        ("/run/nvidia/driver/dev", 614, False),
        ("/run/nvidia/driver/dev/pts/ptmx", 615, False),
        ("/run/nvidia/driver/dev/mqueue/q", 616, True),
        ("/run/nvidia/driver/dev/log", 617, True),
        ("/run/nvidia/driver/dev/termination-log", 618, False),
        ("/run/nvidia/driver/dev/shm/x", 619, True),
        ("/run/nvidia/driver/dev/shmx", 614, False),
        ("/run/nvidia/driver/usr/bin/nvidia-smi", 612, False),
        ("/run/nvidia/driver/sys/class", 620, True),
        ("/run/nvidia/validations/driver-ready", 26, True),
        ("/run/nvidia", 26, True),
        ("/dev/nvidiactl", 24, False),
        ("/dev/pts/0", 25, False),
        ("/var/lib/kubelet", 28, False),
        ("/etc/hostname", 21, False),
        ("/", 21, False),
    ],
)
def test_criu_2509_resolve(path: str, mount_id: int, nodev: bool) -> None:
    entry = table(CRIU_2509).resolve(path)
    assert entry is not None
    assert entry.id == mount_id
    assert entry.nodev is nodev


# ---------------------------------------------------------------- this machine's table


@pytest.mark.parametrize(
    ("path", "mount_id"),
    [
        ("/", 27),
        ("/etc/hostname", 27),
        ("/proc/self/mountinfo", 22),
        ("/sys/kernel", 23),
        ("/sys/fs/cgroup/memory/memory.max", 35),
        ("/sys/fs/cgroup/unified", 41),
        ("/dev/null", 24),
        # /dev/pts and /dev/shm are mounted twice, each time on top of the first one.
        ("/dev/pts/0", 29),
        ("/dev/shm/segment", 30),
    ],
)
def test_sandbox_host_resolve(path: str, mount_id: int) -> None:
    assert resolved_id(table(SANDBOX), path) == mount_id


def test_sandbox_host_root_is_found_although_listed_after_its_children() -> None:
    mounts = table(SANDBOX)
    assert mounts.entries[0].parent_id == 27
    root = by_id(mounts, 27)
    assert (root.mount_point, root.fstype, root.parent_id) == ("/", "ext4", 1)


# ---------------------------------------------------------------- escapes


@pytest.mark.parametrize(
    ("mount_id", "mount_point", "root", "source"),
    [
        (40, "/mnt/with space", "/", "tmpfs"),
        (41, "/mnt/tab\there", "/", "tmpfs"),
        (42, "/mnt/new\nline", "/", "tmpfs"),
        (43, "/mnt/back\\slash", "/", "tmpfs"),
        (44, "/mnt/bind of dir", "/srv/My Data", "/dev/sda1"),
        (45, "/mnt/src", "/", "my#src"),
        (46, "/mnt/not\\040space", "/", "tmpfs"),
        (47, "/mnt/donn\u00e9es", "/", "tmpfs"),
        (49, "/mnt/no-source", "/", ""),
        (50, "/mnt/with space/dev", "/", "tmpfs"),
    ],
)
def test_escaped_fields(mount_id: int, mount_point: str, root: str, source: str) -> None:
    entry = by_id(table(ESCAPES), mount_id)
    assert (entry.mount_point, entry.root, entry.source) == (mount_point, root, source)


@pytest.mark.parametrize(
    ("path", "mount_id"),
    [
        ("/mnt/with space/dev/nvidiactl", 50),
        ("/mnt/with space/other", 40),
        ("/mnt/with space", 40),
        ("/mnt/with", 1),
        ("/mnt/bind of dir/file", 44),
        ("/mnt/new\nline/x", 42),
        ("/mnt/back\\slash", 43),
        ("/mnt/not\\040space/x", 46),
        ("/mnt/not space", 1),
    ],
)
def test_resolve_escaped_paths(path: str, mount_id: int) -> None:
    assert resolved_id(table(ESCAPES), path) == mount_id


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("/plain", "/plain"),
        ("/a b", "/a\\040b"),
        ("/a\tb", "/a\\011b"),
        ("/a\nb", "/a\\012b"),
        ("/a\\b", "/a\\134b"),
        ("/a\\040b", "/a\\134040b"),
        ("/caf\u00e9 #1", "/caf\u00e9\\040#1"),
    ],
)
def test_escape_and_unescape(raw: str, escaped: str) -> None:
    assert escape(raw) == escaped
    assert unescape(escaped) == raw


def test_unescape_leaves_lone_backslashes_alone() -> None:
    assert unescape("/a\\b\\12\\9999") == "/a\\b\\12\\9999"


def test_unescaped_carriage_return_and_unicode_line_breaks_stay_in_the_mount_point() -> None:
    # The kernel escapes only space, tab, newline and backslash; "\r", U+0085 and U+2028
    # reach the table raw and must not split the line.
    odd = "/mnt/a\rb\x85c\u2028d\x0be"
    mounts = parse_mountinfo(
        f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 0:2 / {escape(odd)} rw - tmpfs tmpfs rw\n"
    )
    assert mounts.errors == []
    assert [entry.mount_point for entry in mounts.entries] == ["/", odd]
    assert resolved_id(mounts, odd + "/nvidiactl") == 2


def test_iterable_of_lines_with_newlines() -> None:
    lines = fixture_text(OPTIONAL).splitlines(keepends=True)
    mounts = parse_mountinfo(iter(lines))
    assert mounts.errors == []
    assert [entry.mount_point for entry in mounts.entries] == [
        "/",
        "/shared",
        "/slave",
        "/both",
        "/unbindable",
        "/ro",
        "/overlay",
    ]


# ---------------------------------------------------------------- optional fields


@pytest.mark.parametrize(
    ("mount_point", "optional"),
    [
        ("/", ()),
        ("/shared", ("shared:3",)),
        ("/slave", ("master:4",)),
        ("/both", ("shared:5", "master:6", "propagate_from:7")),
        ("/unbindable", ("unbindable",)),
        ("/ro", ()),
    ],
)
def test_optional_fields(mount_point: str, optional: tuple[str, ...]) -> None:
    (entry,) = [e for e in table(OPTIONAL).entries if e.mount_point == mount_point]
    assert entry.optional == optional
    assert entry.fstype in {"ext4", "tmpfs"}


@pytest.mark.parametrize(
    ("mount_point", "options", "super_options", "nodev"),
    [
        ("/", ("rw",), ("rw", "errors=remount-ro"), False),
        (
            "/ro",
            ("ro", "nosuid", "nodev", "noexec", "relatime"),
            ("ro", "size=4k", "nr_inodes=1024", "mode=755", "uid=0", "gid=0", "inode64"),
            True,
        ),
        (
            "/overlay",
            ("rw", "relatime"),
            ("rw", "lowerdir=/l1:/l2", "upperdir=/u", "workdir=/w", "index=off"),
            False,
        ),
    ],
)
def test_mount_and_super_options(
    mount_point: str, options: tuple[str, ...], super_options: tuple[str, ...], nodev: bool
) -> None:
    (entry,) = [e for e in table(OPTIONAL).entries if e.mount_point == mount_point]
    assert entry.options == options
    assert entry.super_options == super_options
    assert entry.nodev is nodev


def test_nodev_in_super_options_only_does_not_count() -> None:
    entry = parse_line("2 1 0:2 / /x rw,nosuid - tmpfs tmpfs rw,nodev")
    assert entry.nodev is False


# ---------------------------------------------------------------- malformed lines


MALFORMED_ERRORS = [
    (3, "no ' - ' separator after field 6"),
    (4, "mount and parent ids must be numbers"),
    (5, "mount and parent ids must be numbers"),
    (6, "device must be MAJOR:MINOR"),
    (7, "device must be MAJOR:MINOR"),
    (8, "mount point must be absolute"),
    (9, "expected fstype, source and super options after ' - '"),
    (10, "no ' - ' separator after field 6"),
    (13, "expected fstype, source and super options after ' - '"),
    (14, "mount and parent ids must be numbers"),
]


def test_malformed_lines_are_collected_and_the_rest_parses() -> None:
    mounts = table(MALFORMED)
    assert [(error.line_number, error.reason) for error in mounts.errors] == MALFORMED_ERRORS
    assert [entry.mount_point for entry in mounts.entries] == ["/", "/ok", "/late-ok", "/also-ok"]
    assert resolved_id(mounts, "/also-ok/x") == 15


@pytest.mark.parametrize(("line_number", "reason"), MALFORMED_ERRORS)
def test_malformed_line_raises_naming_its_number(line_number: int, reason: str) -> None:
    line = fixture_text(MALFORMED).split("\n")[line_number - 1]
    with pytest.raises(MountinfoError) as raised:
        parse_line(line, line_number)
    assert raised.value.line_number == line_number
    assert raised.value.reason == reason
    assert str(raised.value).startswith(f"mountinfo line {line_number}: {reason}: ")
    assert isinstance(raised.value, ValueError)


def test_error_message_shortens_long_lines() -> None:
    line = "1 0 8:1 / /" + "x" * 300 + " rw tmpfs tmpfs rw"
    with pytest.raises(MountinfoError) as raised:
        parse_line(line, 7)
    message = str(raised.value)
    assert message.startswith("mountinfo line 7: no ' - ' separator")
    assert message.endswith("...'")
    assert len(message) < 200


# ---------------------------------------------------------------- resolve()


def test_resolve_takes_the_deepest_mount_by_whole_components() -> None:
    mounts = synthetic("1|0|/", "2|1|/a", "3|2|/a/b")
    assert resolved_id(mounts, "/a/b/c") == 3
    assert resolved_id(mounts, "/a/b") == 3
    assert resolved_id(mounts, "/a/bc") == 2
    assert resolved_id(mounts, "/a") == 2
    assert resolved_id(mounts, "/ab") == 1
    assert resolved_id(mounts, "/") == 1


def test_resolve_stacked_mount_on_the_same_point_kernel_shape() -> None:
    # A second mount on /a has the first one as its parent.
    mounts = synthetic("1|0|/", "2|1|/a|nodev", "3|2|/a")
    entry = mounts.resolve("/a/nvidiactl")
    assert entry is not None
    assert (entry.id, entry.nodev) == (3, False)


def test_resolve_same_parent_and_mount_point_twice_the_later_wins() -> None:
    mounts = synthetic("1|0|/", "2|1|/a", "3|1|/a")
    assert resolved_id(mounts, "/a/x") == 3


def test_resolve_skips_a_mount_hidden_by_an_over_mounted_parent() -> None:
    # X (2) at /a holds Y (3) at /a/b; then Z (4) is mounted on /a on top of X.
    mounts = synthetic("1|0|/", "2|1|/a", "3|2|/a/b", "4|2|/a")
    assert resolved_id(mounts, "/a/b/c") == 4
    assert resolved_id(mounts, "/a/b") == 4
    assert resolved_id(mounts, "/a") == 4


def test_resolve_over_mounted_parent_with_its_own_child() -> None:
    mounts = synthetic("1|0|/", "2|1|/a", "3|2|/a/b", "4|2|/a", "5|4|/a/b")
    assert resolved_id(mounts, "/a/b/c") == 5


def test_resolve_tucked_mount_keeps_the_one_on_top() -> None:
    # Propagation can slip a new mount (3) beneath an existing one (2), which is reparented.
    mounts = synthetic("1|0|/", "2|3|/a", "3|1|/a")
    assert resolved_id(mounts, "/a/x") == 2


def test_resolve_is_independent_of_line_order() -> None:
    mounts = synthetic("3|2|/a/b", "2|1|/a", "1|0|/")
    assert resolved_id(mounts, "/a/b/c") == 3


def test_resolve_with_spaces_in_components() -> None:
    mounts = synthetic("1|0|/", "2|1|/run/nv driver", "3|2|/run/nv driver/dev")
    assert resolved_id(mounts, "/run/nv driver/dev/nvidiactl") == 3
    assert resolved_id(mounts, "/run/nv driver/lib") == 2
    assert resolved_id(mounts, "/run/nv") == 1


def test_resolve_on_an_empty_table() -> None:
    assert parse_mountinfo("").resolve("/dev/nvidiactl") is None


# ---------------------------------------------------------------- properties

_PATH_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
)
_COMPONENT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00/"),
    min_size=1,
    max_size=12,
).filter(lambda part: part not in {".", ".."})


@given(mount_point=_PATH_TEXT.map(lambda text: "/" + text), root=_PATH_TEXT, source=_PATH_TEXT)
def test_escape_then_parse_round_trips(mount_point: str, root: str, source: str) -> None:
    line = (
        f"100 1 0:50 {escape('/' + root)} {escape(mount_point)} rw,relatime shared:1 master:2 "
        f"- tmpfs {escape(source)} rw,size=64k"
    )
    entry = parse_line(line)
    assert entry.mount_point == mount_point
    assert entry.root == "/" + root
    assert entry.source == source
    assert entry.optional == ("shared:1", "master:2")
    mounts = parse_mountinfo(f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n{line}\n")
    assert mounts.errors == []
    assert mounts.entries[1] == entry


@given(parts=st.lists(_COMPONENT, min_size=1, max_size=5))
def test_resolve_finds_an_arbitrary_mount_point(parts: list[str]) -> None:
    mount_point = "/" + "/".join(parts)
    mounts = parse_mountinfo(
        f"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"100 1 0:50 / {escape(mount_point)} rw - tmpfs tmpfs rw\n"
    )
    assert resolved_id(mounts, mount_point + "/nvidiactl") == 100
    assert resolved_id(mounts, mount_point) == 100
