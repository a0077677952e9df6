"""What the test suites and the benchmarks share, so each fake host and each way of driving
the daemon is written once.

- `host`: the one builder of fake hosts (`FakeHost`): a root, a fake /proc and a fake sysfs,
  built and changed from the process it runs in (in a private mount namespace it mounts,
  unmounts, moves and remounts tmpfs dev roots); mknod'ed nodes, the /proc stand-ins
  (devices, the driver version, each GPU's information), driver-ready, AMD render nodes in
  sysfs; one JSON command at a time (`FakeHost.execute`) for a namespace host in a child.
- `hostfiles`: the same files under their older names (`proc_devices_text`, `mknod`, ...).
- `maps`: looking things up in a map as JSON (`device`, `names`, `problem_codes`).
- `inprocess`: the daemon in process with scripted event sources, on a real tree.
- `daemonproc`: the real daemon as a child process (`DaemonProcess`), the one driver: its log
  (a pipe, or a file that survives a SIGKILL, as the journal's stream when asked) and
  sd_notify datagrams read by a thread, bounded waits for readiness, notifications, log
  lines and maps, `subscribe`, `stop`.
- `processes`: a child's environment (`child_env`), the private-mount-namespace prefix
  (`PRIVATE_MOUNTS`), the probe a fixture skips on (`namespace_problem`),
  `die_with_parent` and `run_scenario_module`.

The harness modules of each suite (tests/daemon/harness.py and nshost.py,
tests/reliability/harness.py, tests/systemd/support.py and mountns.py, tests/criu/simhost.py,
tests/realfs/hostlayout.py, tests/kubernetes/podsim.py, tests/nsrun.py, bench/hostmounts.py,
bench/live.py) import these, keep their old names and hold only their suite's scenarios.
"""
