"""Fault-injection helpers: real `moefleet serve` processes (output to a file, never a pipe that can fill) and
streaming clients in threads that record what they saw and when, so a test can signal or kill mid-stream."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

P = TypeVar("P", bound="_LoggedProcess")

MOEFLEET = str(Path(sys.executable).with_name("moefleet"))
MODEL = "qwen3_norm_topk"
# Long enough contexts for long streams; small prefill chunks keep a step short on a loaded 2-core machine.
SERVE_ARGS = ["--max-model-len", "1024", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"]
SERVE_ARGS += ["--log-level", "warning", "--print-examples"]


class _LoggedProcess:
    """A child process whose output goes to a log file: what both process wrappers below share."""

    base_url: str
    log_path: Path
    _log: Any
    process: subprocess.Popen[bytes]

    def wait_ready(self, timeout: float) -> str:
        """The base URL once the process serves (each wrapper knows how to tell)."""
        raise NotImplementedError

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """Teardown: make sure the process is gone and its log closed."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._log.close()


@contextmanager
def running(process: P, timeout: float) -> Iterator[P]:
    """`process` once ready (`wait_ready(timeout)`), killed when the block ends however it ends."""
    try:
        process.wait_ready(timeout=timeout)
        yield process
    finally:
        process.kill()


class ServeProcess(_LoggedProcess):
    """One `moefleet serve` process (a whole server, or one node of a group)."""

    def __init__(self, model: Path, log: Path, extra: list[str]):
        self.log_path = log
        self._log = log.open("w")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [MOEFLEET, "serve", "--model", str(model), "--port", "0", *SERVE_ARGS, *extra]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.base_url = ""

    def wait_ready(self, timeout: float) -> str:
        """The address from the examples banner (printed once the server listens)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"is serving '[^']+' at (http://\S+)", self.log())
            if match:
                self.base_url = match.group(1)
                return self.base_url
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"server not ready; exit code {self.process.poll()}; log:\n{self.log()[-4000:]}")

    def children(self) -> list[int]:
        """Pids of the rank processes this node spawned (multiprocessing spawn children)."""
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"spawn_main" in cmdline:
                    pids.append(int(pid))
        return sorted(pids)

    def kill(self) -> None:
        """Teardown: make sure nothing is left behind (children too)."""
        pids = self.children() if self.process.poll() is None else []
        super().kill()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@dataclass
class Stream:
    """One streaming completion in a thread: what came back and when (monotonic seconds)."""

    base_url: str
    model: str
    max_tokens: int
    prompt: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    leave_after: int | None = None  # hang up once this many tokens arrived (a client that vanishes)
    status: int | None = None
    tokens: int = 0
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # an SSE error event
    exception: str | None = None  # a transport error (connection reset, timeout)
    done: bool = False  # saw data: [DONE]
    left: bool = False  # hung up on purpose (leave_after)
    started: float = 0.0
    ended: float | None = None

    def __post_init__(self) -> None:
        self.first_token = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Stream:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def _run(self) -> None:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens, "stream": True}
        body |= {"temperature": 0, "ignore_eos": True, "return_token_ids": True}
        try:
            with httpx.stream("POST", self.base_url + "/v1/completions", json=body, timeout=120) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        self.done = True
                        continue
                    event = json.loads(data)
                    if "error" in event:
                        self.error = event["error"]
                        continue
                    choice = event["choices"][0]
                    if choice.get("token_ids"):
                        self.tokens += len(choice["token_ids"])
                        self.first_token.set()
                        if self.leave_after is not None and self.tokens >= self.leave_after:
                            self.left = True
                            return  # leaving the block drops the connection mid-stream
                    if choice["finish_reason"] is not None:
                        self.finish_reason = choice["finish_reason"]
        except httpx.HTTPError as exc:
            self.exception = f"{type(exc).__name__}: {exc}"
        finally:
            self.ended = time.monotonic()
            self.first_token.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def wait_until(condition: Any, timeout: float, interval: float = 0.02) -> float:
    """Poll until `condition()` holds; the seconds it took. Fails the test after `timeout`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not reached within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


def status_of(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, Any]:
    response = httpx.request(method, url, timeout=10, **kwargs)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def record(name: str, **figures: float | int | str) -> None:
    """Append a measured figure to $MOEFLEET_RELIABILITY_FIGURES (JSON lines), for docs/reliability.md."""
    path = os.environ.get("MOEFLEET_RELIABILITY_FIGURES")
    line = json.dumps({"test": name, **figures})
    print(f"figure: {line}")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def metric(base_url: str, name: str, labels: str = "") -> float:
    """One sample of /metrics, e.g. metric(url, "moefleet_requests_total", 'finish_reason="abort"')."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} not in /metrics")


def open_streams(target: _LoggedProcess, max_tokens: int, prompts: list[list[int]]) -> list[Stream]:
    """One stream per prompt to `target` (a server or a gateway), each past its first token before returning."""
    from support.tiny_models import tiny_model_dir

    model = tiny_model_dir(MODEL).name
    streams = [Stream(target.base_url, model, max_tokens, prompt=prompt).start() for prompt in prompts]
    for stream in streams:
        assert stream.first_token.wait(60) and stream.tokens > 0, (stream, target.log()[-2000:])
    return streams


def refuses_new_work(target: _LoggedProcess, *message_words: str) -> float:
    """Seconds until /health answers 503 after the signal; then a new request is refused in OpenAI's shape,
    its message naming the drain (and `message_words`), while /metrics is still scraped."""
    from support.tiny_models import tiny_model_dir

    took = wait_until(lambda: status_of(target.base_url + "/health")[0] == 503, timeout=10)
    body = {"model": tiny_model_dir(MODEL).name, "prompt": [1, 2], "max_tokens": 2}
    status, reply = status_of(target.base_url + "/v1/completions", "POST", json=body)
    assert status == 503, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["type"] == "service_unavailable_error"
    for word in ("draining", *message_words):
        assert word in reply["error"]["message"], reply
    assert status_of(target.base_url + "/metrics")[0] == 200  # still scraped while draining
    return took


SHARED_MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One `moefleet serve` for the load and fuzz tests (they leave it as they found it: nothing in flight)."""
    from support.tiny_models import tiny_model_dir

    log = tmp_path_factory.mktemp("shared-serve") / "serve.log"
    extra = [
        "--max-num-seqs",
        "256",
        "--max-num-batched-tokens",
        "512",
        "--max-request-bytes",
        str(SHARED_MAX_REQUEST_BYTES),
    ]
    with running(ServeProcess(tiny_model_dir(MODEL), log, extra), timeout=120) as server:
        yield server


class GatewayProcess(_LoggedProcess):
    """One `moefleet gateway` process (output to a file)."""

    def __init__(self, log: Path, extra: list[str]):
        from support.reference import free_port

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("a")
        command = [
            MOEFLEET,
            "gateway",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--poll-interval",
            "0.2",
        ]
        self.process = subprocess.Popen([*command, *extra], stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> str:
        def healthy() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the gateway exited ({self.process.returncode}):\n{self.log_path.read_text()}"
                )
            try:
                return httpx.get(self.base_url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, 0.2)
        return self.base_url


@pytest.fixture(scope="session")
def shared_gateway(
    shared_server: ServeProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """`moefleet gateway` in front of the shared server (a local fleet of one group), same request limits."""
    log = tmp_path_factory.mktemp("shared-gateway") / "gateway.log"
    extra = ["--backend", shared_server.base_url, "--max-request-bytes", str(SHARED_MAX_REQUEST_BYTES)]
    with running(GatewayProcess(log, [*extra, "--log-level", "warning"]), timeout=300) as gateway:
        yield gateway
