"""Log format of a real server process (``python -m service``) by where stderr goes: a terminal (a
pty) gets text, with the start-up line as a summary; anything else gets JSON lines (containers,
Kubernetes, CI: and the test fixtures, whose servers write to a file); ``--log-format`` decides
when given."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fixtures.servers import MODELS, REPO_ROOT, free_port, start_server, wait_for

from service import installed_version

TIMEOUT_S = 60.0


class PtyServer:
    """``python -m service`` with stdout and stderr on a pseudo-terminal; what it wrote so far."""

    def __init__(self, *args: str) -> None:
        self.primary, secondary = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", *args]
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=secondary, stderr=secondary
        )
        os.close(secondary)
        self.output = ""

    def read_until(self, text: str | None) -> str:
        """Read until ``text`` has been written (None: until the process closes the terminal)."""
        return self._read(lambda: text is not None and text in self.output, text, closing_fails=text is not None)

    def read_until_any(self, *texts: str) -> str:
        """Read until one of ``texts`` has been written, or the process closed the terminal."""
        return self._read(lambda: any(text in self.output for text in texts), texts, closing_fails=False)

    def _read(self, done: Callable[[], bool], what: object, closing_fails: bool) -> str:
        """Read until ``done()``, or until the process closes the terminal (an assertion error
        when ``closing_fails``), within TIMEOUT_S."""
        deadline = time.monotonic() + TIMEOUT_S
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"waited {TIMEOUT_S:.0f} s for {what!r}:\n{self.output[-3000:]}"
            ready, _, _ = select.select([self.primary], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.primary, 65536)
            except OSError:  # EIO: every writer closed the terminal
                chunk = b""
            if not chunk:
                assert not closing_fails, f"the process closed the terminal before {what!r}:\n{self.output[-3000:]}"
                break
            self.output += chunk.decode(errors="replace").replace("\r\n", "\n")
        return self.output

    def finish(self) -> int:
        """Everything it writes until it exits; its exit status."""
        self.read_until(None)
        os.close(self.primary)
        return self.process.wait(TIMEOUT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_text_summary_on_a_terminal() -> None:
    for attempt in range(5):  # a port picked free can be taken before the server binds it: again
        http, metrics = free_port(), free_port()
        server = PtyServer(
            "--model-repository",
            str(MODELS),
            "--provider",
            "cpu",
            "--http-port",
            str(http),
            "--metrics-port",
            str(metrics),
        )
        try:
            started = server.read_until_any("    loading   ", "Address already in use")  # the summary's last line
            if "    loading   " in started:
                server.process.send_signal(signal.SIGINT)  # Ctrl-C
            status = server.finish()
        finally:
            server.kill()
        if "Address already in use" not in server.output or attempt == 4:
            break
    out = server.output
    assert status == 0, out[-3000:]
    assert not [line for line in out.splitlines() if line.startswith("{")], out[:3000]  # no JSON line
    summary = out[out.index("INFO service: server started") :].splitlines()
    grpc_port = summary[1].split(":")[1].split()[0]
    assert summary[:9] == [
        f"INFO service: server started (model-serving {installed_version()}), ready",
        f"    gRPC      127.0.0.1:{grpc_port} (serving.v1.ModelService, inference.GRPCInferenceService, health, "
        "reflection)",
        f"    HTTP      127.0.0.1:{http} (KServe V2 REST)",
        f"    metrics   http://127.0.0.1:{metrics}/metrics",
        "    models    fashion_cnn v1, fashion_softmax v1, house_price v1, profit v1",
        "    provider  CPUExecutionProvider",
        "    security  TLS off, auth off",
        "    reload    off",
        "    loading   lenient (the server starts with what loaded)",
    ]
    assert "INFO service.core.registry: model loaded profit/1 on CPUExecutionProvider: population float32" in out
    assert out.rstrip().endswith("INFO service: server stopped")


def test_refusal_on_a_terminal_is_its_plain_line() -> None:
    server = PtyServer("--model-repository", "/nonexistent", "--http-port", "0", "--metrics-port", "0")
    try:
        status = server.finish()
    finally:
        server.kill()
    assert status == 1
    assert server.output.splitlines()[-1] == "model-serving: error: model repository /nonexistent is not a directory"
    assert "Traceback" not in server.output and "never awaited" not in server.output


def test_log_format_json_wins_on_a_terminal() -> None:
    server = PtyServer("--log-format", "json", "--model-repository", "/nonexistent", "--http-port", "0")
    try:
        status = server.finish()
    finally:
        server.kill()
    records = [json.loads(line) for line in server.output.splitlines()]  # every line is JSON
    assert status == 1
    assert records[-1]["reason"] == "model repository /nonexistent is not a directory"


def test_json_when_not_a_terminal(tmp_path: Path) -> None:
    """Output to a file (the fixture's servers), no --log-format: JSON lines only, and the
    start-up line keeps its fields."""
    with start_server(tmp_path, "--model-repository", str(MODELS)) as proc:
        pass
    assert proc.process.returncode == 0
    records = [json.loads(line) for line in proc.log().splitlines()]  # every line is JSON
    started = next(r for r in records if r["msg"] == "server started")
    assert started["version"] == installed_version() and started["ready"] is True
    assert started["models"] == {"fashion_cnn": [1], "fashion_softmax": [1], "house_price": [1], "profit": [1]}
    assert {"address", "http_port", "metrics_port", "tls", "auth", "providers", "failed", "services"} <= set(started)


def test_log_format_text_wins_when_not_a_terminal(tmp_path: Path) -> None:
    """--log-format text into a file (a container that wants plain lines): the same text lines
    and start-up summary as on a terminal, no JSON line."""
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--log-format", "text"]
    with start_server(tmp_path, *args, http=False, listening=False) as proc:
        wait_for(lambda: "    loading   " in proc.log(), "the start-up summary", server=proc)
        assert proc.stop() == 0
    lines = proc.log().splitlines()
    assert lines and not [line for line in lines if line.startswith("{")], lines[:20]
    started = lines.index(next(line for line in lines if "INFO service: server started" in line))
    assert lines[started + 1].startswith("    gRPC      127.0.0.1:")
    assert lines[started + 4] == "    models    fashion_cnn v1, fashion_softmax v1, house_price v1, profit v1"
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO service: server stopped", lines[-1]), lines[-1]
