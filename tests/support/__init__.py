"""What the test suites and the benchmarks share, so each fake host and each way of driving
the daemon is written once.

- `hostfiles`: the files of a fake host: `/proc/devices` text, character nodes.
- `maps`: looking things up in a map as JSON (`device`, `names`, `problem_codes`).
- `inprocess`: the daemon in process with scripted event sources, on a real tree.

The harness modules of each suite (tests/daemon/harness.py, tests/reliability/harness.py,
tests/systemd/support.py, bench/hostmounts.py) import these and keep their old names.
"""
