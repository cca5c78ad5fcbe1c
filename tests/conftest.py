"""Shared fixtures: models built on the spot, and real vLLM servers reused across tests.

Starting a vLLM server costs ~40 s on CPU (three processes each import vLLM), so
servers are pooled by (model, arguments) and tests that need the same one share
it; at most two run at once per pytest-xdist worker (`make test` runs two, one
test file each at a time: files are grouped by the servers they share).
"""

import os
import re
import shutil
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from vllm_slim.fixtures.models import build_model
from vllm_slim.serving import Server

TRAINED_MODEL = Path(__file__).parents[1] / "vllm_slim" / "fixtures" / "trained" / "tiny-llama-pysrc"

# Code prompts of several shapes; the long one goes through chunked prefill.
PROMPTS = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self",
    "# Copyright 2001 Python Software Foundation\n" * 12,
    "for i in range(10):\n    print(",
)

# Same memory setting for every server, so capacities compare.
SERVER_ARGS = (
    "--max-model-len", "1024", "--gpu-memory-utilization", "0.15", "--enforce-eager",
    "--block-size", "32", "--max-num-seqs", "8",
    # Small steps: long prompts go through chunked prefill.
    "--max-num-batched-tokens", "64",
    # The model runs in the engine's own process (GPU vLLM's default on one GPU). The CPU build's default
    # starts a worker process of its own, one more import of vLLM: ~25 s a server, a third of a start.
    # The demo's test keeps that default (it starts its servers itself).
    "--distributed-executor-backend", "uni",
)
# The CPU build turns "uni" back into "mp" unless the engine is told it may share its process; and there it
# binds no core, so one compute thread a server: two workers' servers with OpenMP's default two threads each
# spin against each other on two cores (1,000 greedy tokens took 100 s instead of 8).
SERVER_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}


def core_binding() -> dict[str, str]:
    """Under pytest-xdist, one core per worker for the compute threads of servers started the CPU build's
    default way (a worker process): left to itself it binds every such server to core 0, and two
    workers' servers would share it. (The pool's servers run one thread in the engine's process, unbound.)"""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if worker is None:
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": str(int(worker.removeprefix("gw")) % os.cpu_count())}


def require_tool(name: str, package: str) -> str:
    """The path of a command a test needs: missing, the test skips on a dev machine and fails under CI
    (`.ci/run` sets CI=1), so a check CI is meant to run is never skipped there."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed ({package}); CI must run this check")
        pytest.skip(f"{name} ({package}) is not installed")
    return path


def wait_for(condition, timeout: float = 60.0, every: float = 0.2, message=None):
    """Poll `condition()` until it is truthy and return its value; past `timeout` s, fail with `message`
    (a string, or a function that says what is still wrong)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message or f"not reached within {timeout} s")
        time.sleep(every)
    return value


@pytest.fixture
def bound_to_core(monkeypatch):
    """Servers that the code under test starts itself (not through `servers`) keep to this worker's core."""
    for name, value in core_binding().items():
        monkeypatch.setenv(name, value)


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One compute thread per worker for in-process torch too: two spinning threads per worker on
    # two cores, beside the other worker's server, made the in-process tests ten times slower.
    torch.set_num_threads(1)


class ServerPool:
    def __init__(self, max_alive: int = 2):
        self.max_alive = max_alive
        self.alive: OrderedDict[tuple, Server] = OrderedDict()

    def get(self, model: Path | str, *args: str, env: dict[str, str] | None = None) -> Server:
        key = (str(model), args, tuple(sorted((env or {}).items())))
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= self.max_alive:
            self.alive.popitem(last=False)[1].stop()
        server = Server(str(model), [*SERVER_ARGS, *args], env={**SERVER_ENV, **(env or {})}).__enter__()
        self.alive[key] = server
        return server

    def close(self) -> None:
        for server in self.alive.values():
            server.stop()


# The files whose servers take longest, longest first (CI's --durations). `make test` passes
# --no-loadscope-reorder, so xdist hands files to its workers in this order and the long ones do not
# queue up at the end on one worker while the other idles.
SLOW_FILES_FIRST = (
    "test_slim_server.py", "test_slim_bf16_server.py", "test_sata_server.py", "test_metrics_server.py",
    "test_slim_families.py", "test_slim_refusals.py", "test_demo.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def servers():
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(arch, **options) -> model dir, built once per session per options."""
    built: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(arch: str, **options) -> Path:
        key = repr((arch, sorted(options.items())))  # option values may be lists
        if key not in built:
            name = re.sub(r"[^\w.=-]+", "_", "-".join([arch, *(f"{k}={v}" for k, v in sorted(options.items()))]))
            built[key] = build_model(arch, root / name, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def prompts() -> tuple[str, ...]:
    return PROMPTS


@pytest.fixture(scope="session")
def trained_model() -> Path:
    assert (TRAINED_MODEL / "config.json").exists(), f"trained fixture missing at {TRAINED_MODEL}"
    return TRAINED_MODEL


@pytest.fixture(scope="session")
def refused_startup():
    """refused_startup(model, *args, env=None) -> the log of a server that must exit during start-up."""

    def start(model: Path | str, *args: str, env: dict | None = None) -> str:
        server = Server(str(model), [*SERVER_ARGS, *args], env={**SERVER_ENV, **(env or {})})
        try:
            with pytest.raises(RuntimeError, match="vLLM server exited"):
                server.__enter__()
        finally:
            server.stop()  # one that came up after all must not keep serving (and holding a core)
        return server.log()

    return start


@pytest.fixture(scope="session")
def check_chat_and_streaming():
    """check(server, prompt): chat and text completions answer, and streaming gives the same text."""

    def check(server: Server, prompt: str) -> None:
        body = {"model": server.model, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        messages = [{"role": "user", "content": "Write a Python function."}]
        chat = server.post("/v1/chat/completions", {**body, "messages": messages})
        text = chat["choices"][0]["message"]["content"]
        assert chat["usage"]["completion_tokens"] == 24 and text
        assert "".join(server.stream("/v1/chat/completions", {**body, "messages": messages})) == text
        completion = server.post("/v1/completions", {**body, "prompt": prompt})["choices"][0]["text"]
        assert "".join(server.stream("/v1/completions", {**body, "prompt": prompt})) == completion

    return check
