"""Running the client as a system service: systemd units and launchd property lists."""
