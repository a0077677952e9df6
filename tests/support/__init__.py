"""What the test suites and the benchmarks share, so each fake host and each way of driving
the daemon is written once.

- `hostfiles`: the files of a fake host: `/proc/devices` text, character nodes.
- `maps`: looking things up in a map as JSON (`device`, `names`, `problem_codes`).
- `inprocess`: the daemon in process with scripted event sources, on a real tree.
- `daemonproc`: the real daemon as a child process (`DaemonProcess`): its log and sd_notify
  datagrams read by a thread, bounded waits for readiness, log lines and maps, `subscribe`.
- `processes`: a child's environment (`child_env`), the private-mount-namespace prefix
  (`PRIVATE_MOUNTS`), the probe a fixture skips on (`namespace_problem`), and
  `run_scenario_module`.

The harness modules of each suite (tests/daemon/harness.py, tests/reliability/harness.py,
tests/systemd/support.py, tests/criu/simhost.py, tests/realfs/hostlayout.py, tests/nsrun.py,
bench/hostmounts.py, bench/live.py) import these and keep their old names.
"""
