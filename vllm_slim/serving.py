"""Start and talk to the stock vLLM OpenAI server (demo, tests and benchmarks share this).

The CPU build's `vllm` console script looks up a distribution named `vllm` and
fails, so the server is always started as `python -m vllm.entrypoints.openai.api_server`.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def api_server_command(model: str, args: list[str]) -> list[str]:
    """The `vllm serve MODEL ARGS` equivalent that works with both vLLM builds."""
    return [sys.executable, "-m", API_SERVER_MODULE, "--model", model, *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real vLLM OpenAI server in a subprocess, its output kept in a log file."""

    def __init__(self, model: str, args: list[str], startup_timeout: float = 600.0, env: dict | None = None):
        self.port = free_port()
        self.model = model
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                api_server_command(self.model, self.args),
                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {self.startup_timeout}s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def post(self, path: str, payload: dict, timeout: float = 300.0) -> dict:
        """POST JSON to the server and return the decoded JSON answer."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def stream(self, path: str, payload: dict, stop_after: int | None = None) -> list[str]:
        """The text pieces of a streamed answer. With `stop_after`, hang up after that many pieces:
        closing the connection makes the server abort the request."""
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps({**payload, "stream": True}).encode(),
            headers={"Content-Type": "application/json"},
        )
        pieces = []
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                if stop_after is not None and len(pieces) >= stop_after:
                    break
        return pieces

    def post_in_background(self, path: str, payload: dict, timeout: float = 600.0) -> Future:
        """`post` on a thread of its own: the future's result is the decoded answer, or its error."""
        answer = Future()

        def run() -> None:
            try:
                answer.set_result(self.post(path, payload, timeout=timeout))
            except Exception as error:  # raised by answer.result()
                answer.set_exception(error)

        threading.Thread(target=run, daemon=True).start()
        return answer

    def sample_held(
        self, path: str, payload: dict, hold_at: list[int], sample: Callable[[], object],
    ) -> tuple[dict, list]:
        """POST `payload` in the background with the engine held once its request holds each of `hold_at`
        output tokens (`vllm_slim.fixtures.hold`: the server needs its HOLD_ARGS); at each hold, take
        `sample()` until two in a row agree (the API server has caught up with the held engine), then let
        the engine go on (leaving early removes the hold directory, which releases every hold). Returns the
        request's answer and one sample per hold."""
        with tempfile.TemporaryDirectory(prefix="vllm-slim-hold-") as hold_dir:
            held = {**payload, "vllm_xargs": {"hold_at": list(hold_at), "hold_dir": hold_dir}}
            answer = self.post_in_background(path, held)
            samples = []
            for length in hold_at:
                deadline = time.monotonic() + 300
                while not Path(hold_dir, f"held-{length}").exists():
                    if answer.done() or time.monotonic() > deadline:
                        answer.result(timeout=0)  # the request's own error, if it failed
                        raise RuntimeError(f"the engine never held at {length} output tokens:\n{self.log_tail()}")
                    time.sleep(0.05)
                previous, current = object(), sample()
                while current != previous:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"/metrics still changing with the engine held: {previous} -> {current}")
                    time.sleep(0.1)
                    previous, current = current, sample()
                samples.append(current)
                Path(hold_dir, f"release-{length}").touch()
            return answer.result(timeout=600), samples

    def greedy_tokens(self, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
        """Greedy completion token ids for `prompts`, sent as one request (decoded as one batch)."""
        return self.greedy_completions(prompts, max_tokens)[1]

    def greedy_completions(self, prompts: list[str], max_tokens: int = 32) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt token ids as the server tokenized them, greedy completion token ids) for `prompts`, sent as
        one request (decoded as one batch)."""
        answer = self.post("/v1/completions", {
            "model": self.model, "prompt": prompts, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
        })
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        return [c["prompt_token_ids"] for c in choices], [c["token_ids"] for c in choices]

    def cache_config(self) -> dict[str, str]:
        """The labels of `vllm:cache_config_info` (num_gpu_blocks, block_size, ...)."""
        match = re.search(r"vllm:cache_config_info\{([^}]*)\}", self.metrics())
        if not match:
            raise RuntimeError("vllm:cache_config_info not on /metrics")
        return dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))

    def capacity_tokens(self) -> int:
        """Tokens the engine's KV cache holds: num_gpu_blocks x block_size."""
        info = self.cache_config()
        return int(info["num_gpu_blocks"]) * int(info["block_size"])

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            return r.read().decode()
