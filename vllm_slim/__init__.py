"""vllm-slim: Slim (K-only cache) and SATA attention backends for vLLM.

`vllm_slim.ops` is plain torch and imports without vLLM; `register` is the
`vllm.general_plugins` entry point and is the only place that touches vLLM.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point; runs in every vLLM process."""
    from vllm_slim.backends.registration import register_backends

    register_backends()
