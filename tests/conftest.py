"""Shared fixtures: models built on the spot, and real vLLM servers reused across tests.

Starting a vLLM server costs ~20-60 s on CPU, so servers are pooled by (model,
arguments) and tests that need the same one share it; at most two run at once.
"""

from collections import OrderedDict
from pathlib import Path

import pytest

from vllm_slim.fixtures.models import build_model
from vllm_slim.serving import Server

TRAINED_MODEL = Path(__file__).parents[1] / "vllm_slim" / "fixtures" / "trained" / "tiny-llama-pysrc"

# Same memory setting for every server, so capacities compare.
SERVER_ARGS = (
    "--max-model-len", "1024", "--gpu-memory-utilization", "0.3", "--enforce-eager",
    "--block-size", "32", "--max-num-seqs", "8",
    # Small steps: long prompts go through chunked prefill.
    "--max-num-batched-tokens", "64",
)


class ServerPool:
    def __init__(self, max_alive: int = 2):
        self.max_alive = max_alive
        self.alive: OrderedDict[tuple, Server] = OrderedDict()

    def get(self, model: Path | str, *args: str) -> Server:
        key = (str(model), args)
        if key in self.alive:
            self.alive.move_to_end(key)
            return self.alive[key]
        while len(self.alive) >= self.max_alive:
            self.alive.popitem(last=False)[1].stop()
        server = Server(str(model), [*SERVER_ARGS, *args]).__enter__()
        self.alive[key] = server
        return server

    def close(self) -> None:
        for server in self.alive.values():
            server.stop()


@pytest.fixture(scope="session")
def servers():
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """models(arch, **options) -> model dir, built once per session per options."""
    built: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def get(arch: str, **options) -> Path:
        key = (arch, *sorted(options.items()))
        if key not in built:
            name = "-".join([arch, *(f"{k}={v}" for k, v in sorted(options.items()))])
            built[key] = build_model(arch, root / name, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def trained_model() -> Path:
    assert (TRAINED_MODEL / "config.json").exists(), f"trained fixture missing at {TRAINED_MODEL}"
    return TRAINED_MODEL
