"""vLLM glue: backend classes, registration in every vLLM process, weight binding."""
