"""The vllm_slim_* gauges on a live server's stock /metrics, checked against numbers worked out here
from config.json and the weights; then a real Prometheus scrapes a slim and a sata server and evaluates
every query of the Grafana dashboard through its HTTP API."""

import json
import math
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from conftest import require_tool, wait_for
from vllm_slim.fixtures.hold import HOLD_ARGS
from vllm_slim.serving import free_port

pytestmark = pytest.mark.server

# Long enough that the live tests' requests hold many blocks and pass sata's break-even length (579
# tokens on the fixture); sata's state does not grow with the context, so a long limit costs it nothing.
MAX_MODEL_LEN = 16384
LONG_REQUEST_TOKENS = 2000
SLIM_ARGS = ("--attention-backend", "slim", "--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN),
             "--additional-config", json.dumps({"slim": {"spill_per_head": 2}}), *HOLD_ARGS)
SATA_ARGS = ("--attention-backend", "sata", "--max-model-len", str(MAX_MODEL_LEN), *HOLD_ARGS)
SATA_ORDER = 3


@pytest.fixture(scope="module")
def config(trained_model) -> dict:
    raw = json.loads((trained_model / "config.json").read_text())
    return {
        "layers": raw["num_hidden_layers"],
        "kv_heads": raw["num_key_value_heads"],
        "head_size": raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
    }


@pytest.fixture(scope="module")
def long_model(trained_model, tmp_path_factory) -> Path:
    """The trained model with positions up to MAX_MODEL_LEN (its RoPE extends; the metrics count
    tokens, whatever they say)."""
    model = tmp_path_factory.mktemp("long-model") / trained_model.name
    shutil.copytree(trained_model, model)
    raw = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**raw, "max_position_embeddings": MAX_MODEL_LEN}))
    return model


def scrape(server) -> list:
    """One read of /metrics: every sample."""
    return [sample for family in text_string_to_metric_families(server.metrics()) for sample in family.samples]


def gauge(source, name: str, **labels) -> float:
    """The one sample of `name` for engine 0 (and `labels`), from a server (a fresh scrape) or a scrape."""
    samples = scrape(source) if hasattr(source, "metrics") else source
    values = [
        s.value for s in samples
        if s.name == name and s.labels.get("engine") == "0" and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(values) == 1, f"{name}{labels}: {len(values)} samples on /metrics"
    return values[0]


def cache_geometry(server) -> tuple[int, int]:
    info = server.cache_config()
    return int(info["num_gpu_blocks"]), int(info["block_size"])


def stock_capacity(num_blocks: int, block_bytes: int, block_size: int, stock_per_token: int, map_bytes: int = 0) -> int:
    """Tokens the stock cache holds in the same memory (slim's value maps' too), in whole blocks."""
    return (num_blocks * block_bytes + map_bytes) // (block_size * stock_per_token) * block_size


def body(server, max_tokens: int) -> dict:
    return {"model": server.model, "prompt": "def main():\n", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def finished(request: Future, max_tokens: int) -> None:
    assert request.result(timeout=600)["usage"]["completion_tokens"] == max_tokens


def test_slim_gauges_equal_the_layout_worked_out_from_config(servers, long_model, config):
    server = servers.get(long_model, *SLIM_ARGS)
    layers, heads, d = config["layers"], config["kv_heads"], config["head_size"]
    stock = layers * heads * 2 * d * 2  # bf16 K and V
    ours = layers * heads * (d + 2) * 2  # float16 K plus 2 spill coordinates per head
    # float32 W_KV [w, w], refinement [2w, w], spill-in [2w, r], W_SV [r, w] per layer (w = heads x d)
    width, spill = heads * d, heads * 2
    maps = layers * 4 * (width * width + 2 * width * width + 2 * width * spill + spill * width)
    num_blocks, block_size = cache_geometry(server)
    assert gauge(server, "vllm_slim_kv_cache_bytes_per_token") == ours
    assert gauge(server, "vllm_slim_stock_kv_cache_bytes_per_token") == stock
    assert gauge(server, "vllm_slim_kv_cache_capacity_tokens") == num_blocks * block_size
    assert gauge(server, "vllm_slim_value_map_bytes") == maps
    assert gauge(server, "vllm_slim_stock_kv_cache_capacity_tokens") == stock_capacity(
        num_blocks, ours * block_size, block_size, stock, maps
    )
    assert "vllm_slim_sata_state_bytes_per_sequence" not in {s.name for s in scrape(server)}  # sata's gauges only for sata


def test_slim_per_layer_numerics_come_from_the_weights(servers, trained_model, long_model, config):
    server = servers.get(long_model, *SLIM_ARGS)
    weights = load_file(trained_model / "model.safetensors")
    for i in range(config["layers"]):
        layer = f"model.layers.{i}.self_attn.attn"
        w_k = weights[f"model.layers.{i}.self_attn.k_proj.weight"].double()
        exported = gauge(server, "vllm_slim_layer_w_k_condition_number", layer=layer)
        assert exported == pytest.approx(torch.linalg.cond(w_k).item(), rel=1e-6), layer
        assert gauge(
            server, "vllm_slim_layer_policy_info", layer=layer, backend="slim",
            policy="K in float16 (refined from K and V), spill 2/head",
        ) == 1
        # the spill is what makes 16-bit storage safe: far below the paper's K-only layout
        slim = gauge(server, "vllm_slim_layer_v_relative_error", layer=layer, layout="slim")
        paper = gauge(server, "vllm_slim_layer_v_relative_error", layer=layer, layout="paper")
        assert 0 < slim < paper / 10, (layer, slim, paper)


def test_slim_saved_bytes_follow_the_blocks_a_long_request_holds(servers, long_model, config):
    server = servers.get(long_model, *SLIM_ARGS)
    num_blocks, block_size = cache_geometry(server)
    saved_per_block = block_size * (
        gauge(server, "vllm_slim_stock_kv_cache_bytes_per_token") - gauge(server, "vllm_slim_kv_cache_bytes_per_token")
    )
    assert gauge(server, "vllm_slim_kv_cache_saved_bytes") == 0

    def sample() -> tuple[float, float, float]:
        now = scrape(server)
        return gauge(now, "vllm:num_requests_running"), gauge(now, "vllm_slim_kv_cache_saved_bytes"), \
            gauge(now, "vllm:kv_cache_usage_perc")

    holds = [1, block_size, LONG_REQUEST_TOKENS - 1]
    answer, samples = server.sample_held("/v1/completions", body(server, LONG_REQUEST_TOKENS), holds, sample)
    prompt = answer["usage"]["prompt_tokens"]
    for generated, (running, saved, usage) in zip(holds, samples):
        assert running == 1
        # the blocks the held request's tokens fill, as vLLM counts them (its usage is over all blocks
        # but its null block) and as the saved bytes do
        blocks = -(-(prompt + generated) // block_size)
        assert (saved, round(usage * (num_blocks - 1))) == (blocks * saved_per_block, blocks), (generated, saved, usage)
    wait_for(lambda: gauge(server, "vllm_slim_kv_cache_saved_bytes") == 0, timeout=10)


def test_sata_gauges_equal_the_state_worked_out_from_config(servers, long_model, config):
    server = servers.get(long_model, *SATA_ARGS)
    layers, heads, d = config["layers"], config["kv_heads"], config["head_size"]
    # Per layer and KV head: C(d + P - 1, P - 1) basis features x (d_v numerator columns + 1 normalizer), float32.
    per_sequence = layers * heads * math.comb(d + SATA_ORDER - 1, SATA_ORDER - 1) * (d + 1) * 4
    stock = layers * heads * 2 * d * 2  # the fixture's dtype, bfloat16
    num_blocks, block_size = cache_geometry(server)
    assert gauge(server, "vllm_slim_sata_state_bytes_per_sequence") == per_sequence
    assert gauge(server, "vllm_slim_kv_cache_bytes_per_token") == pytest.approx(per_sequence / MAX_MODEL_LEN)
    assert gauge(server, "vllm_slim_stock_kv_cache_bytes_per_token") == stock
    assert gauge(server, "vllm_slim_kv_cache_capacity_tokens") == num_blocks * MAX_MODEL_LEN
    assert gauge(server, "vllm_slim_stock_kv_cache_capacity_tokens") == stock_capacity(
        num_blocks, per_sequence, block_size, stock
    )
    assert gauge(server, "vllm_slim_layer_policy_info", layer="model.layers.0.self_attn.attn",
                 backend="sata", policy="order 3 (degrees 0..2), float32 state") == 1
    assert "vllm_slim_layer_w_k_condition_number" not in {s.name for s in scrape(server)}


def test_sata_live_state_and_equivalent_cache(servers, long_model, config):
    """While a request runs: one state, the stock cache its tokens would take, and the savings as their
    difference: negative short of the break-even length, positive past it. A second request that joins
    and is cancelled mid-stream leaves the count with its state (vLLM drops it without finished stats)."""
    server = servers.get(long_model, *SATA_ARGS)
    per_sequence = gauge(server, "vllm_slim_sata_state_bytes_per_sequence")
    stock = gauge(server, "vllm_slim_stock_kv_cache_bytes_per_token")
    break_even = per_sequence / stock
    assert LONG_REQUEST_TOKENS > 2 * break_even > 100
    cancelled = ThreadPoolExecutor(1)
    streamed = []

    def sample() -> tuple[float, ...]:
        if not streamed:  # at the first hold; it runs once the engine goes on, ~280 steps before the next
            streamed.append(cancelled.submit(server.stream, "/v1/completions", body(server, 500), stop_after=5))
        now = scrape(server)
        names = ("sata_state_bytes", "sata_equivalent_kv_bytes", "kv_cache_saved_bytes")
        return gauge(now, "vllm:num_requests_running"), *(gauge(now, f"vllm_slim_{name}") for name in names)

    holds = [8, round(break_even) // 2, 2 * round(break_even)]
    answer, samples = server.sample_held("/v1/completions", body(server, LONG_REQUEST_TOKENS), holds, sample)
    prompt = answer["usage"]["prompt_tokens"]
    assert len(streamed[0].result(timeout=60)) == 5
    cancelled.shutdown()
    for generated, (running, state, equivalent, saved) in zip(holds, samples):
        assert running == 1 and state == per_sequence  # one sequence, one state, however long
        assert equivalent == (prompt + generated) * stock
        assert saved == equivalent - state
    assert [saved > 0 for *_, saved in samples] == [False, False, True]
    wait_for(lambda: gauge(server, "vllm_slim_sata_state_bytes") == 0, timeout=10)
    assert gauge(server, "vllm_slim_sata_equivalent_kv_bytes") == 0
    assert gauge(server, "vllm_slim_kv_cache_saved_bytes") == 0


# ---- a real Prometheus over both servers, every dashboard query through its HTTP API ----

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "dashboards" / "vllm-slim.json"


def dashboard_queries() -> dict[str, str]:
    """'panel title [refId]' -> PromQL, Grafana's variables filled as 'All' would, and the template
    variables' label_values() series."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for panel in dashboard["panels"] for p in (panel, *panel.get("panels", []))]
    queries = {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in panels for target in panel.get("targets", [])
    }
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries[f"variable {variable['name']}"] = variable["query"].removeprefix("label_values(").rsplit(",", 1)[0]
    return {name: re.sub(r"\$\w+", ".*", expr.replace("$__rate_interval", "1m")) for name, expr in queries.items()}


def prometheus_query(url: str, expr: str) -> list:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as response:
        answer = json.loads(response.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.fixture
def prometheus(tmp_path):
    """prometheus(targets) -> URL of a real Prometheus scraping `targets` every second."""
    binary = require_tool("prometheus", "Debian's prometheus package, which .ci/run installs")
    started = []

    def start(targets: list[str]) -> str:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "vllm", "static_configs": [{"targets": targets}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = open(tmp_path / "prometheus.log", "wb")
        started.append(subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        ))
        url = f"http://127.0.0.1:{port}"

        def scraping_all() -> bool:
            try:
                return len(prometheus_query(url, "up == 1")) == len(targets)
            except OSError:  # not listening yet
                return False

        wait_for(scraping_all, timeout=60, every=0.5)
        return url

    yield start
    for process in started:
        process.terminate()
        process.wait(timeout=30)


def test_prometheus_scrapes_both_backends_and_every_dashboard_query_returns_data(
    servers, long_model, prometheus
):
    slim, sata = servers.get(long_model, *SLIM_ARGS), servers.get(long_model, *SATA_ARGS)
    url = prometheus([slim.url.removeprefix("http://"), sata.url.removeprefix("http://")])
    # Traffic on both, so rates and latency quantiles have samples in their window.
    requests = [server.post_in_background("/v1/completions", body(server, 300)) for server in (slim, sata) * 2]
    for request in requests:
        finished(request, 300)
    queries = dashboard_queries()
    assert len(queries) > 25, "the dashboard lost its panels, or this test no longer finds them"
    # Scrapes land every second: poll until every query has data (bounded), then name any without.
    empty = lambda: {name: expr for name, expr in queries.items() if not prometheus_query(url, expr)}  # noqa: E731
    wait_for(lambda: not empty(), timeout=60, every=1,
             message=lambda: f"dashboard queries with no data: {json.dumps(empty(), indent=1)}")
    # Our gauges reach Prometheus with vLLM's labels, one series per server.
    saved = prometheus_query(url, "vllm_slim_kv_cache_capacity_tokens")
    assert {s["metric"]["instance"] for s in saved} == {slim.url[7:], sata.url[7:]}
    assert all(s["metric"]["model_name"] == str(long_model) for s in saved)
