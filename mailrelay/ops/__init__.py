"""Running the server: control socket, mail log and metrics, systemd, DNS records."""
