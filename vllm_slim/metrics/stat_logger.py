"""The API server's half: the `vllm_slim_*` gauges (`gauges.py`) on the stock /metrics, set by a
stat-logger plugin (entry point `vllm.stat_logger_plugins`), one per engine, at every engine step."""

import functools

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.engine.output_processor import OutputProcessor
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_slim.metrics.gauges import gauge
from vllm_slim.metrics.report import CacheReport, load

logger = init_logger(f"vllm.{__name__}")

REPORT_TIMEOUT_S = 30.0  # the worker writes its report before the engine reports ready


class AbortedTokens:
    """Prompt and generated tokens of the requests this API server aborted (a client gone, a timeout)
    after the stat loggers had counted them: vLLM drops an aborted request without finished stats, so
    the held-token count would keep them until the engine idles. Counted by `OutputProcessor.abort_requests`,
    wrapped once per process; taken by the engine's stat logger."""

    pending = 0

    @classmethod
    def take(cls) -> int:
        tokens, cls.pending = cls.pending, 0
        return tokens

    @classmethod
    def count_in(cls, processor: type) -> None:
        abort_requests = processor.abort_requests
        if getattr(abort_requests, "counts_aborted_tokens", False):
            return

        @functools.wraps(abort_requests)
        def counting(self, request_ids, internal):
            states = dict(self.request_states)  # abort_requests pops the aborted ones
            aborted = abort_requests(self, request_ids, internal)
            for request_id in aborted:
                state = states.get(request_id)
                # Not prefilling: its first output came, which is when the loggers count the prompt.
                if state is not None and state.stats is not None and not state.is_prefilling:
                    cls.pending += state.prompt_len + state.stats.num_generation_tokens
            return aborted

        counting.counts_aborted_tokens = True
        processor.abort_requests = counting


class SlimStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: VllmConfig, engine_index: int = 0):
        from vllm_slim.backends.registration import BACKENDS

        backend = vllm_config.attention_config.backend
        self.active = backend is not None and backend.name in BACKENDS
        self.engine_index = engine_index
        self.num_stages = vllm_config.parallel_config.pipeline_parallel_size
        self.labels = {"model_name": vllm_config.model_config.served_model_name, "engine": str(engine_index)}
        self.cache_config = vllm_config.cache_config
        self.max_model_len = vllm_config.model_config.max_model_len
        self.report: CacheReport | None = None
        self.tokens_held = 0  # prompt and generated tokens of the sequences running now
        # One engine's logger can take every aborted request's tokens; with several, the request's
        # engine is not known here and the count keeps them until that engine idles.
        counts_tokens = self.active and backend.name == "SATA"  # slim's gauges count blocks
        self.takes_aborted = counts_tokens and vllm_config.parallel_config.data_parallel_size == 1
        if self.takes_aborted:
            AbortedTokens.count_in(OutputProcessor)
        elif counts_tokens:
            logger.warning(
                "vllm-slim: with %d data-parallel engines, vllm_slim_sata_equivalent_kv_bytes counts an aborted "
                "request's tokens until its engine idles", vllm_config.parallel_config.data_parallel_size,
            )

    def log_engine_initialized(self) -> None:
        if not self.active:
            return
        self.report = load(self.engine_index, self.num_stages, REPORT_TIMEOUT_S)
        if self.report is None:
            logger.warning(
                "vllm-slim: engine %d's worker left no cache report (SLIM_REPORT_DIR not shared?): "
                "the vllm_slim_* gauges stay absent", self.engine_index,
            )
            return
        self._set_static()

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if self.report is None:
            return
        if iteration_stats is not None:
            self.tokens_held += iteration_stats.num_prompt_tokens + iteration_stats.num_generation_tokens
            self.tokens_held -= sum(
                done.num_prompt_tokens + done.num_generation_tokens for done in iteration_stats.finished_requests
            )
        if scheduler_stats is None:
            return
        if self.takes_aborted:  # with the stats that show their state freed, or the step before
            self.tokens_held -= AbortedTokens.take()
        if scheduler_stats.num_running_reqs == 0:
            self.tokens_held = 0  # no sequence holds cache (and no count can drift past idle)
        # vLLM's usage is over the blocks it can hand out: all but its null block.
        blocks_held = round(scheduler_stats.kv_cache_usage * (self.cache_config.num_gpu_blocks - 1))
        held_bytes = blocks_held * self._block_bytes()
        if self.report.backend == "sata":
            equivalent = self.tokens_held * self.report.stock_bytes_per_token
            self._set("vllm_slim_sata_state_bytes", held_bytes)
            self._set("vllm_slim_sata_equivalent_kv_bytes", equivalent)
        else:
            equivalent = blocks_held * self.cache_config.block_size * self.report.stock_bytes_per_token
        self._set("vllm_slim_kv_cache_saved_bytes", equivalent - held_bytes)

    def _block_bytes(self) -> int:
        """One cache block, all layers: a page of block_size tokens (slim), one sequence's state (sata)."""
        if self.report.state_bytes_per_sequence is not None:
            return self.report.state_bytes_per_sequence
        return round(self.report.bytes_per_token * self.cache_config.block_size)

    def _set_static(self) -> None:
        report, block_size = self.report, self.cache_config.block_size
        num_blocks = self.cache_config.num_gpu_blocks
        tokens_per_block = self.max_model_len if report.backend == "sata" else block_size
        # The stock backend would have the cache's memory and slim's value maps' too.
        stock_blocks = (num_blocks * self._block_bytes() + report.map_bytes) // (block_size * report.stock_bytes_per_token)
        self._set("vllm_slim_kv_cache_bytes_per_token", report.bytes_per_token)
        self._set("vllm_slim_stock_kv_cache_bytes_per_token", report.stock_bytes_per_token)
        self._set("vllm_slim_kv_cache_capacity_tokens", num_blocks * tokens_per_block)
        self._set("vllm_slim_stock_kv_cache_capacity_tokens", stock_blocks * block_size)
        self._set("vllm_slim_kv_cache_saved_bytes", 0)
        if report.backend == "slim":
            self._set("vllm_slim_value_map_bytes", report.map_bytes)
        if report.state_bytes_per_sequence is not None:
            self._set("vllm_slim_sata_state_bytes_per_sequence", report.state_bytes_per_sequence)
            self._set("vllm_slim_sata_state_bytes", 0)
            self._set("vllm_slim_sata_equivalent_kv_bytes", 0)
        for layer in report.layers:
            self._set("vllm_slim_layer_policy_info", 1, layer=layer.name, backend=report.backend, policy=layer.policy)
            if layer.w_k_condition_number is not None:
                self._set("vllm_slim_layer_w_k_condition_number", layer.w_k_condition_number, layer=layer.name)
                for layout, error in (("slim", layer.v_error), ("paper", layer.v_error_paper), ("stock", layer.v_error_stock)):
                    self._set("vllm_slim_layer_v_relative_error", error, layer=layer.name, layout=layout)
        logger.info(
            "vllm-slim: %s cache %.1f B/token against stock %d B/token; capacity %d tokens against "
            "stock %d at the same memory; vllm_slim_* gauges on /metrics",
            report.backend, report.bytes_per_token, report.stock_bytes_per_token,
            num_blocks * tokens_per_block, stock_blocks * block_size,
        )

    def _set(self, name: str, value: float, **labels: str) -> None:
        gauge(name).labels(**self.labels, **labels).set(value)
