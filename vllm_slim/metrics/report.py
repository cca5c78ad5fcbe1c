"""What the worker knows about the cache, handed to the API server that serves /metrics.

The layout slim picks (spill width, stored dtype) and the per-layer numerics behind it are
decided in the worker, after the weights load; /metrics lives in the API server. The worker
writes one JSON report per engine into a directory that every process of one `vllm serve`
shares: `register()` creates it in the first process that loads the plugin (the API server,
or `vllm serve`'s parent when it runs several API servers) and exports its path in
SLIM_REPORT_DIR, which the engine and worker processes it spawns inherit. Set the variable
yourself to a directory both sides can read when they do not share a parent (headless engines).
"""

import atexit
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPORT_DIR_ENV = "SLIM_REPORT_DIR"  # not VLLM_*: vLLM warns about VLLM_ variables it does not know


@dataclass(frozen=True)
class LayerReport:
    name: str
    policy: str  # what the backend chose for this layer, in words
    w_k_condition_number: float | None = None  # slim: cond(W_K)
    v_error: float | None = None  # slim: predicted relative V error of the chosen layout
    v_error_paper: float | None = None  # slim: the same for the paper's layout (K only, no spill)
    v_error_stock: float | None = None  # slim: the stock cache's own V rounding error


@dataclass(frozen=True)
class CacheReport:
    backend: str  # "slim" or "sata"
    bytes_per_token: float  # all layers; sata: its state spread over max_model_len tokens
    stock_bytes_per_token: int  # all layers: K and V of every KV head in the stock cache dtype
    state_bytes_per_sequence: int | None = None  # sata: one sequence's state, all layers
    layers: list[LayerReport] = field(default_factory=list)
    map_bytes: int = 0  # slim: every layer's value maps (memory the stock cache would have had)

    @classmethod
    def from_json(cls, text: str) -> "CacheReport":
        raw = json.loads(text)
        return cls(**{**raw, "layers": [LayerReport(**layer) for layer in raw["layers"]]})


def ensure_report_dir() -> Path:
    """This server's report directory: inherited, or made here (and removed when this process exits)."""
    if not os.environ.get(REPORT_DIR_ENV):
        path = tempfile.mkdtemp(prefix="vllm-slim-")
        os.environ[REPORT_DIR_ENV] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(os.environ[REPORT_DIR_ENV])


def _report_path(engine_index: int, stage: int) -> Path | None:
    directory = os.environ.get(REPORT_DIR_ENV)
    return Path(directory) / f"engine-{engine_index}-stage-{stage}.json" if directory else None


def publish(report: CacheReport, engine_index: int, stage: int) -> Path | None:
    """Write one pipeline stage's report atomically; None when no directory is shared."""
    path = _report_path(engine_index, stage)
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(asdict(report)))
    partial.replace(path)
    return path


def load(engine_index: int, num_stages: int, timeout_s: float = 0.0) -> CacheReport | None:
    """The engine's report (its pipeline stages' layers together), waiting up to `timeout_s` for it."""
    paths = [_report_path(engine_index, stage) for stage in range(num_stages)]
    deadline = time.monotonic() + timeout_s
    while paths[0] is not None and not all(path.exists() for path in paths):
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)
    if paths[0] is None:
        return None
    return merge_stages([CacheReport.from_json(path.read_text()) for path in paths])


def merge_stages(stages: list[CacheReport]) -> CacheReport:
    """One report over the layers of every pipeline stage (each stage holds some of the layers)."""
    if len(stages) == 1:
        return stages[0]
    per_sequence = [stage.state_bytes_per_sequence for stage in stages]
    return CacheReport(
        backend=stages[0].backend,
        bytes_per_token=sum(stage.bytes_per_token for stage in stages),
        stock_bytes_per_token=sum(stage.stock_bytes_per_token for stage in stages),
        state_bytes_per_sequence=None if None in per_sequence else sum(per_sequence),
        layers=[layer for stage in stages for layer in stage.layers],
        map_bytes=sum(stage.map_bytes for stage in stages),
    )
