"""The bundled example configuration, run the way README's first command runs it."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import yaml

from tests.support.relay import free_port

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config"
README_USER = "me@example.com"


def readme_password() -> str:
    match = re.search(r"password \*\*`([^`]+)`\*\*", (REPO / "README.md").read_text())
    assert match, "README must give the example user's password"
    return match.group(1)


def test_example_config_is_what_readme_promises():
    settings = yaml.safe_load((EXAMPLE / "mailrelay.yaml").read_text())
    assert settings["listen"] == {
        "smtp": ["127.0.0.1:2525"], "submission": ["127.0.0.1:2587"],
        "submission_tls": ["127.0.0.1:2465"],
    }
    assert settings["tls"]["self_signed"] is True
    result = subprocess.run([sys.executable, "-m", "mailrelay.cli.main", "check", "-c",
                             str(EXAMPLE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "domain example.com: 1 user(s)" in result.stdout


async def test_example_config_serves_and_delivers_locally(tmp_path):
    config = tmp_path / "config"
    shutil.copytree(EXAMPLE, config, ignore=shutil.ignore_patterns("var"))
    settings = yaml.safe_load((config / "mailrelay.yaml").read_text())
    ports = {name: free_port() for name in settings["listen"]}
    settings["listen"] = {name: [f"127.0.0.1:{port}"] for name, port in ports.items()}
    metrics_port = free_port()  # the example's 9125 may be taken, or used by a parallel run
    settings["metrics"]["listen"] = f"127.0.0.1:{metrics_port}"
    (config / "mailrelay.yaml").write_text(yaml.safe_dump(settings))

    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailrelay.cli.main", "serve", "-c", str(config),
        stderr=asyncio.subprocess.PIPE)
    try:
        log = b""
        while b"mailrelay ready" not in log:
            line = await asyncio.wait_for(server.stderr.readline(), 30)
            assert line, f"server exited: {log.decode()}"
            log += line
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # the example's certificate is self-signed
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=ports["submission"],
                               tls_context=insecure, start_tls=True)
        await smtp.connect()
        await smtp.ehlo()
        await smtp.auth_plain(README_USER, readme_password())
        await smtp.sendmail(README_USER, [README_USER],
                            b"Subject: readme\r\n\r\nfrom the example config\r\n")
        await smtp.quit()
        new = config / "var" / "mail" / "example.com" / "me" / "new"
        for _ in range(100):
            if new.is_dir() and list(new.iterdir()):
                break
            await asyncio.sleep(0.1)
        [delivered] = list(new.iterdir())
        assert b"from the example config" in delivered.read_bytes()
        # The example serves metrics on loopback.
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert response.startswith(b"HTTP/1.0 200 ")
        assert b'mailrelay_messages_queued_total{port="submission"} 1.0' in response
    finally:
        server.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.wait(), 30) == 0
