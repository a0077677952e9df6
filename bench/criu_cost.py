"""What the CRIU action script adds to a dump and to a restore.

Run as root: `python -m bench.criu_cost [--runs N]`. It needs the CRIU that
`tests/criu/fetch_criu.sh .criu` prepares (it runs the script, a no-op once CRIU is there),
and serves a simulated host with the real daemon (tests/criu/simhost.py: a node `nvidia5`
carrying the numbers of /dev/zero), so the action does its whole work: at pre-dump it asks the
daemon, walks the tree and writes the record; at pre-restore it reads the record, asks the
daemon and checks every used device. CRIU runs the script once per stage: pre-dump and
post-dump for a dump; pre-restore, post-restore, pre-resume and post-resume for a restore.

The same small tree (`sh` with a child `sleep` that holds /dev/zero) is dumped and restored
`--runs` times per variant, the variants interleaved so that drift hits them alike:

- no action script (the baseline);
- `gpu-device-watcher-criu-action` of this venv (an editable install in a checkout);
- the same checkout laid out in a new venv (made by `python -m venv`, with its pip) as
  `pip install` of the wheel lays it out (tests.criu.harness.stage_venv_install), what a
  node that installs the package runs;
- with `--before TREE` (a checkout of an earlier version): that version's action, started as
  its install started it (its /bin/sh script in a new venv like the one above; before there
  was one, the console script pip generates, `import re` first), beside this one's, in the
  same run.

Beside the stages, a bare `python -I -c pass` of the same interpreter is timed the same way,
interleaved with them: the stage costs are also given as ratios to it, which carry over
between machines better than milliseconds.

The `cuda-checkpoint` wrapper (watcher/criu/wrapper.sh) is timed beside the binary it runs
(a compiled stand-in, a shell script where there is no compiler), whole processes started by
name through PATH as CRIU's CUDA plugin starts them, interleaved: a pass-through call
(`--get-state --pid P`: the wrapper first on PATH, the binary next) against the binary run
directly, and `--action restore --pid P` for a record whose GPU moved (the wrapper asks the
daemon, runs the restore gate and adds `--device-map`) against `python -I -c pass`.

With `--mounts N` (default 10,000) the action alone and the wrapper are measured after the
mount table is grown to N lines (tmpfs mounts in the private mount namespace the bench runs
in; after the dumps and restores, which CRIU makes with the table as it was): every exec
and path lookup costs more then, and the action makes more of them than a bare start.

Figures are medians of wall time around the `criu` command. Python's bytecode cache is
compiled first (`compileall` on `watcher/`), as a wheel install does: with
PYTHONDONTWRITEBYTECODE set and no cache, every stage would recompile the package.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hostmounts import grow_mount_table, mount_tmpfs, reexec_unshared, umount
from tests.criu.harness import (
    ACTION,
    REPO,
    Criu,
    CriuUnavailable,
    prepare_criu,
    spawn_tree,
    stage_venv_install,
    stage_wrapper,
)
from tests.criu.harness import subreaper as adopt_orphans
from tests.criu.simhost import SimHost

RUNS = 15
STAGE_RUNS = 30
MOUNTS = 10_000


THIS_VENV = "action (this venv)"
WHEEL = "action (wheel, new venv)"


@dataclass
class Variant:
    label: str
    action: Path | None
    # The interpreter the action runs on, for its `python -I -c pass` baseline.
    python: str = sys.executable
    dump_ms: list[float] = field(default_factory=list)
    restore_ms: list[float] = field(default_factory=list)


def _before_variant(work: Path, before: Path) -> Variant:
    """An earlier version's action as its install started it: its /bin/sh script in a new
    venv of its own (from the version that has one), else the console script pip generated."""
    if (before / "scripts" / ACTION.name).exists():
        bin_dir = stage_venv_install(work / "venv-before", with_pip=True, tree=before)
        return Variant("action (before)", bin_dir / ACTION.name, str(bin_dir / "python3"))
    compileall.compile_dir(str(before / "watcher"), quiet=1)
    return Variant("action (before)", _console_script(work, before))


def _console_script(directory: Path, tree: Path) -> Path:
    """The console script pip generates for `watcher.criu:console_main`, importing `tree`."""
    script = directory / "gpu-device-watcher-criu-action-before"
    script.write_text(
        f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\n"
        f"sys.path.insert(0, {str(tree)!r})\n"
        "from watcher.criu import console_main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(console_main())\n"
    )
    script.chmod(0o755)
    return script


def _median(samples: list[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def _one_round(criu: Criu, host: SimHost, variant: Variant, work: Path, number: int) -> None:
    images = work / f"{variant.label.replace(' ', '-')}-{number}"
    tree = spawn_tree("/dev/zero")
    try:
        dumped = criu.dump(tree.root, images, host.env(), action=variant.action)
        if not dumped.ok:
            raise RuntimeError(dumped.explain())
        tree.gone()
        restored = criu.restore(images, host.env(), action=variant.action)
        if not restored.ok:
            raise RuntimeError(restored.explain())
        variant.dump_ms.append(dumped.seconds * 1000)
        variant.restore_ms.append(restored.seconds * 1000)
    finally:
        tree.close()
        shutil.rmtree(images, ignore_errors=True)


def _run_once(command: list[str], env: dict[str, str]) -> float:
    """Wall ms of one run, which must succeed."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, timeout=30, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"{command} {env.get('CRTOOLS_SCRIPT_ACTION')}: {done.stderr!r}")
    return elapsed


def _stage_costs(
    host: SimHost, script: Path, python: str, work: Path, runs: int
) -> dict[str, float]:
    """The action alone, started as CRIU starts it, per kind of stage; and `python -I -c pass`
    of the interpreter it runs on, interleaved with the stages (one warm-up round)."""
    images = work / f"stage-images-{script.parent.name}-{script.name}"
    images.mkdir(exist_ok=True)
    tree = spawn_tree("/dev/zero")
    try:
        base = host.env(CRTOOLS_IMAGE_DIR=str(images), CRTOOLS_INIT_PID=str(tree.root))
        # In this order: pre-restore checks the record that pre-dump writes.
        commands = {
            "python": ([python, "-I", "-c", "pass"], {}),
            **{
                name: ([str(script)], {**base, "CRTOOLS_SCRIPT_ACTION": action})
                for name, action in (
                    ("pre-dump", "pre-dump"),
                    ("pre-restore", "pre-restore"),
                    ("other", "post-resume"),
                )
            },
        }
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for number in range(runs + 1):
            for name, (command, env) in commands.items():
                elapsed = _run_once(command, env)
                if number:  # the first round warms the page cache and the bytecode
                    samples[name].append(elapsed)
        return {name: statistics.median(values) for name, values in samples.items()}
    finally:
        tree.close()


_STAND_IN_C = """#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) printf("%s%s", argv[i], i + 1 < argc ? " " : "\\n");
    return 0;
}
"""
# A UUID no simulated GPU has: the record's GPU lands on nvidia5 (same model) with a map.
_MOVED_FROM = "GPU-00000000-1111-2222-3333-444444444444"


def _stand_in(directory: Path) -> Path:
    """A `cuda-checkpoint` that prints its arguments: compiled where a compiler is."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = directory / "cuda-checkpoint"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is not None:
        source = directory / "stand-in.c"
        source.write_text(_STAND_IN_C)
        done = subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(source)],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode == 0:
            return binary
    binary.write_text('#!/bin/sh\necho "$*"\n')
    binary.chmod(0o755)
    return binary


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, float, bytes]:
    """(wall ms, CPU ms of the whole process tree, stdout) of one run."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output, errors = process.communicate(timeout=30)
    wall = (time.perf_counter() - started) * 1000
    if process.returncode != 0:
        raise RuntimeError(f"{command}: exit {process.returncode}: {errors!r}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, output


def _interleaved(
    commands: dict[str, tuple[list[str], dict[str, str]]], runs: int
) -> dict[str, Any]:
    """Median wall and CPU ms of each command, run in turn `runs` times (one warm-up each)."""
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    outputs: dict[str, bytes] = {}
    for number in range(runs + 1):
        for name, (command, env) in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            wall, cpu_after, output = _timed(command, env)
            outputs[name] = output
            if number:  # the first round warms the page cache and the bytecode
                walls[name].append(wall)
                cpus[name].append(cpu_after - (before.ru_utime + before.ru_stime) * 1000)
    return {
        name: {
            "wall_ms": round(statistics.median(walls[name]), 3),
            "cpu_ms": round(statistics.median(cpus[name]), 3),
            "output": outputs[name].decode(errors="replace").strip(),
        }
        for name in commands
    }


def _wrapper_costs(host: SimHost, work: Path, runs: int) -> dict[str, Any]:
    """The cuda-checkpoint wrapper: pass-through beside the binary, restore beside python."""
    real = _stand_in(work / "real")
    wrapper = stage_wrapper(work / "wrapper")
    images = work / "wrapper-images"
    images.mkdir(exist_ok=True)
    tree = spawn_tree("/dev/zero")
    try:
        environment = host.env(CRTOOLS_IMAGE_DIR=str(images), CRTOOLS_INIT_PID=str(tree.root))
        environment["PATH"] = f"{wrapper.parent}:{real.parent}:/usr/bin:/bin"
        recorded = subprocess.run(
            [str(ACTION)],
            env={**environment, "CRTOOLS_SCRIPT_ACTION": "pre-dump"},
            capture_output=True,
            timeout=30,
            check=False,
        )
        if recorded.returncode != 0:
            raise RuntimeError(f"pre-dump for the wrapper's record: {recorded.stderr!r}")
        record_path = images / "gpu-device-watcher.json"
        record = json.loads(record_path.read_text())
        for entry in record["used"]:
            if entry.get("gpu"):
                entry["gpu"]["uuid"] = _MOVED_FROM
        record_path.write_text(json.dumps(record))
        state = ["--get-state", "--pid", str(tree.root)]
        restore = ["--action", "restore", "--pid", str(tree.root)]
        figures = _interleaved(
            {
                "direct": ([str(real), *state], environment),
                "wrapped": (["cuda-checkpoint", *state], environment),
                "python": ([sys.executable, "-I", "-c", "pass"], {}),
                "restore": (["cuda-checkpoint", *restore], environment),
            },
            runs,
        )
    finally:
        tree.close()
    if "--device-map" not in figures["restore"]["output"]:
        raise RuntimeError(f"the wrapper added no device map: {figures['restore']['output']!r}")
    for entry in figures.values():
        entry.pop("output")
    return {"stand_in": "compiled" if real.read_bytes()[:4] == b"\x7fELF" else "sh", **figures}


def measure(
    runs: int = RUNS,
    stage_runs: int = STAGE_RUNS,
    before: Path | None = None,
    mounts: int = MOUNTS,
) -> dict[str, Any]:
    """Dumps and restores with and without the action; raises CriuUnavailable without CRIU.

    Run inside a private mount namespace (`main` re-executes itself so) when `mounts`."""
    if os.geteuid() != 0:
        raise CriuUnavailable("needs root (CRIU, unshare -m, mknod)")
    criu = Criu(prepare_criu(), verbosity=None)
    compileall.compile_dir(str(REPO / "watcher"), quiet=1)
    version = subprocess.run(
        [str(criu.binary), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout.split("\n", 1)[0]

    work = Path(tempfile.mkdtemp(prefix="gdw-criu-cost-"))
    mount_lines: int | None = None
    try:
        with adopt_orphans(), SimHost(work / "host") as host:
            wheel = stage_venv_install(work / "venv", with_pip=True)
            variants = [
                Variant("no action script", None),
                Variant(THIS_VENV, ACTION),
                Variant(WHEEL, wheel / ACTION.name, str(wheel / "python3")),
            ]
            if before is not None:
                variants.append(_before_variant(work, before))
            # One unmeasured round each: page cache, CRIU's kernel-feature cache, pyc files.
            for variant in variants:
                _one_round(criu, host, variant, work, -1)
                variant.dump_ms.clear()
                variant.restore_ms.clear()
            for number in range(runs):
                rotation = number % len(variants)
                for variant in variants[rotation:] + variants[:rotation]:
                    _one_round(criu, host, variant, work, number)
            if mounts:
                # Under one tmpfs of their own, detached whole (children too) at the end.
                (work / "mounts").mkdir()
                mount_tmpfs(str(work / "mounts"), "size=16m")
                mount_lines = grow_mount_table(work / "mounts", mounts)
            stages: dict[str, dict[str, float]] = {}
            for variant in variants[1:]:
                assert variant.action is not None
                stages[variant.label] = _stage_costs(
                    host, variant.action, variant.python, work, stage_runs
                )
            wrapper = _wrapper_costs(host, work, stage_runs)
    finally:
        if mount_lines:
            umount(str(work / "mounts"), lazy=True)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "version": version,
        "runs": runs,
        "stage_runs": stage_runs,
        "variants": [
            {
                "label": variant.label,
                "dump_ms": round(_median(variant.dump_ms), 2),
                "restore_ms": round(_median(variant.restore_ms), 2),
            }
            for variant in variants
        ],
        "stages": stages,
        "mount_lines": mount_lines,
        "python_ms": round(stages[THIS_VENV]["python"], 2),
        "cuda_checkpoint": wrapper,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.criu_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=RUNS, help="dumps and restores per variant")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument(
        "--before", type=Path, help="a checkout of an earlier version, measured beside this one"
    )
    parser.add_argument(
        "--mounts",
        type=int,
        default=MOUNTS,
        help="mount table lines while the action alone is timed (0: as it is)",
    )
    arguments = parser.parse_args(argv)
    if arguments.mounts:
        reexec_unshared()
    try:
        result = measure(arguments.runs, before=arguments.before, mounts=arguments.mounts)
    except CriuUnavailable as error:
        sys.exit(f"bench.criu_cost: no CRIU: {error}")
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(result, indent=1) + "\n")

    baseline = result["variants"][0]
    base_dump, base_restore = baseline["dump_ms"], baseline["restore_ms"]
    print(f"{result['version']}; {arguments.runs} dumps and restores per row; median wall time")
    print(f"{'':24}  {'dump ms':>8}  {'added':>7}  {'restore ms':>10}  {'added':>7}")
    for variant in result["variants"]:
        dump, restore = variant["dump_ms"], variant["restore_ms"]
        added_dump = "" if variant is baseline else f"{dump - base_dump:+7.1f}"
        added_restore = "" if variant is baseline else f"{restore - base_restore:+7.1f}"
        print(
            f"{variant['label']:24}  {dump:8.1f}  {added_dump:>7}  {restore:10.1f}  "
            f"{added_restore:>7}"
        )
    print()
    lines = result["mount_lines"]
    table = f"{lines} mount table lines" if lines else "the mount table as it was"
    print(f"the action alone, started as CRIU starts it (median of {STAGE_RUNS}; {table}):")
    print(f"{'':24}  {'pre-dump':>8}  {'pre-restore':>11}  {'other stage':>11}  {'python':>6}")
    for label, costs in result["stages"].items():
        python_ms = costs["python"]
        print(
            f"{label:24}  {costs['pre-dump']:8.1f}  {costs['pre-restore']:11.1f}  "
            f"{costs['other']:11.1f}  {python_ms:6.1f}"
        )
        print(
            f"{'  x python -I -c pass':24}  {costs['pre-dump'] / python_ms:8.2f}  "
            f"{costs['pre-restore'] / python_ms:11.2f}  {costs['other'] / python_ms:11.2f}"
        )
    print("(a dump runs 2 stages, a restore 4; times in ms; python: `python -I -c pass` of the")
    print(" interpreter the action runs on, interleaved with its stages)")
    wrapper = result["cuda_checkpoint"]
    print()
    print(f"the cuda-checkpoint wrapper (median of {STAGE_RUNS}; {wrapper['stand_in']} stand-in):")
    print(f"{'':34}  {'wall ms':>8}  {'CPU ms':>7}")
    for name, label in (
        ("direct", "stand-in run directly"),
        ("wrapped", "the same call through the wrapper"),
        ("python", "python -I -c pass"),
        ("restore", "--action restore with a device map"),
    ):
        print(f"{label:34}  {wrapper[name]['wall_ms']:8.2f}  {wrapper[name]['cpu_ms']:7.2f}")
    added = wrapper["wrapped"]["wall_ms"] - wrapper["direct"]["wall_ms"]
    ratio = wrapper["restore"]["wall_ms"] / wrapper["python"]["wall_ms"]
    print(f"pass-through adds {added:+.2f} ms (goal <= 2); restore is {ratio:.2f}x python (<= 1.6)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
