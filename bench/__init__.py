"""Benchmarks for gpu-device-watcher: every figure is a ratio against a baseline run alongside."""
