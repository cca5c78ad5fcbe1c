# vLLM's OpenAI-compatible server (GPU) with the vllm-slim plugin installed:
#
#   docker build -t vllm-slim:0.1.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-slim:0.1.0 MODEL --attention-backend slim
#
# Without arguments it serves the small Llama shipped in the package with slim.
FROM vllm/vllm-openai:v0.33.0

WORKDIR /opt/vllm-slim
COPY pyproject.toml README.md LICENSE ./
COPY vllm_slim ./vllm_slim
# --no-deps: vLLM, torch and transformers stay the image's, built and pinned together.
RUN uv pip install --system --no-cache --no-deps .

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
CMD ["/opt/vllm-slim/vllm_slim/fixtures/trained/tiny-llama-pysrc", "--attention-backend", "slim"]
