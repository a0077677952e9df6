"""The systemd integration: unit files, sd_notify, socket activation, watchdog, reload, sandbox."""
