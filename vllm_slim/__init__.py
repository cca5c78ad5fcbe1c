"""vllm-slim: Slim (K-only cache) and SATA attention backends for vLLM.

`vllm_slim.ops` is plain torch and imports without vLLM; `register` is the
`vllm.general_plugins` entry point, `metrics.stat_logger.SlimStatLogger` the
`vllm.stat_logger_plugins` one.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point; runs in every vLLM process."""
    from vllm_slim.backends.registration import register_backends
    from vllm_slim.metrics.report import ensure_report_dir

    ensure_report_dir()  # before vLLM spawns the engine: its processes inherit the path
    register_backends()
