"""Operations: how the server meets its host (systemd, control socket, logs, metrics)."""
