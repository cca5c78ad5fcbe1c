"""Cache-savings gauges on vLLM's own /metrics: the worker reports the layout (`worker.py`), the API
server's stat-logger plugin turns it and the engine's live usage into `vllm_slim_*` gauges
(`stat_logger.py`); `report.py` is the hand-over between the two."""
