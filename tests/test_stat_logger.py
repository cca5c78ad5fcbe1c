"""The API server's stat logger without a server: the live gauges it sets from the engine's step stats,
at the lengths a live test cannot be sure to sample (tests/test_metrics_server.py samples real servers)."""

from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from vllm_slim.metrics.report import REPORT_DIR_ENV, CacheReport, publish
from vllm_slim.metrics import stat_logger
from vllm_slim.metrics.stat_logger import SlimStatLogger

STATE_BYTES = 2_000_000  # one sequence's state, all layers
STOCK_PER_TOKEN = 4096  # break-even: 488.3 tokens


def engine_config(backend: str | None) -> SimpleNamespace:
    """What the stat logger reads of vLLM's config: an engine with one state block in use of two (sata),
    its model named after the backend (the gauges live in one registry for the whole test process)."""
    return SimpleNamespace(
        attention_config=SimpleNamespace(backend=backend and SimpleNamespace(name=backend)),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, data_parallel_size=1),
        model_config=SimpleNamespace(served_model_name=f"stat-logger-test-{backend}", max_model_len=1024),
        cache_config=SimpleNamespace(num_gpu_blocks=3, block_size=1024),
    )


def sata_logger(tmp_path, monkeypatch, backend: str | None = "SATA") -> SlimStatLogger:
    """A stat logger as vLLM builds it, its worker's sata report read from the shared directory."""
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))
    publish(CacheReport("sata", STATE_BYTES / 1024, STOCK_PER_TOKEN, state_bytes_per_sequence=STATE_BYTES), 0, 0)
    logger = SlimStatLogger(engine_config(backend))
    logger.log_engine_initialized()
    return logger


def step(logger: SlimStatLogger, prompt: int = 0, generated: int = 0, running: int = 1, finished=()) -> dict:
    """One engine step's stats recorded; the live gauges after it."""
    logger.record(
        SimpleNamespace(num_running_reqs=running, kv_cache_usage=0.5 * running),
        SimpleNamespace(num_prompt_tokens=prompt, num_generation_tokens=generated, finished_requests=list(finished)),
    )
    return {
        name: REGISTRY.get_sample_value(f"vllm_slim_{name}", logger.labels)
        for name in ("sata_state_bytes", "sata_equivalent_kv_bytes", "kv_cache_saved_bytes")
    }


def test_sata_savings_are_negative_short_of_the_break_even_and_positive_past_it(tmp_path, monkeypatch):
    logger = sata_logger(tmp_path, monkeypatch)
    held = step(logger, prompt=100)
    assert held == {"sata_state_bytes": STATE_BYTES, "sata_equivalent_kv_bytes": 100 * STOCK_PER_TOKEN,
                    "kv_cache_saved_bytes": 100 * STOCK_PER_TOKEN - STATE_BYTES}
    assert held["kv_cache_saved_bytes"] < 0
    for _ in range(400):  # one token a step, to 500: past the break-even
        held = step(logger, generated=1)
    assert held["sata_equivalent_kv_bytes"] == 500 * STOCK_PER_TOKEN
    assert held["kv_cache_saved_bytes"] == 500 * STOCK_PER_TOKEN - STATE_BYTES > 0
    # The request ends: nothing held, whatever the counts said.
    done = SimpleNamespace(num_prompt_tokens=100, num_generation_tokens=400)
    assert step(logger, running=0, finished=[done]) == pytest.approx(
        {"sata_state_bytes": 0, "sata_equivalent_kv_bytes": 0, "kv_cache_saved_bytes": 0}
    )


@pytest.mark.parametrize("backend", [None, "CPU_ATTN", "FLASH_ATTN"])
def test_nothing_is_exported_for_another_backend(tmp_path, monkeypatch, backend):
    """Even with a report lying in the shared directory: the plugin's gauges belong to its own backends."""
    assert step(sata_logger(tmp_path, monkeypatch, backend), prompt=100) == dict.fromkeys(
        ("sata_state_bytes", "sata_equivalent_kv_bytes", "kv_cache_saved_bytes")
    )


def test_a_missing_worker_report_is_a_warning_and_no_gauges(tmp_path, monkeypatch):
    monkeypatch.setenv(REPORT_DIR_ENV, str(tmp_path))  # shared, but the worker wrote nothing
    monkeypatch.setattr(stat_logger, "REPORT_TIMEOUT_S", 0.3)
    warnings = []
    monkeypatch.setattr(stat_logger.logger, "warning", lambda message, *args: warnings.append(message % args))
    logger = SlimStatLogger(engine_config("SLIM"))
    logger.log_engine_initialized()
    assert warnings == ["vllm-slim: engine 0's worker left no cache report (SLIM_REPORT_DIR not shared?): "
                        "the vllm_slim_* gauges stay absent"]
    assert step(logger, prompt=100) == dict.fromkeys(("sata_state_bytes", "sata_equivalent_kv_bytes", "kv_cache_saved_bytes"))
