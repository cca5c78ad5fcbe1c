"""`make demo` as a newcomer runs it: the bundled bf16 model served by slim and by stock with the same
explicit KV budget. What it prints is what it measured; the capacity is the README's and what
`vllm-slim inspect` predicts for the model, whose served layout line is the one the server logged."""

import re

import pytest

from vllm_slim.cli import main
from vllm_slim.demo import KV_CACHE_BYTES, MAX_TOKENS, TRAINED_MODEL, run_demo


@pytest.mark.server
def test_demo_prints_the_capacity_and_agreement_it_measured(capsys, monkeypatch, bound_to_core):
    main(["inspect", str(TRAINED_MODEL)])
    inspected = capsys.readouterr().out
    served_layout = re.search(r"bfloat16 \(served\)\s+(layout: .*)", inspected).group(1)
    stock_per_token, slim_per_token = (
        int(n.replace(",", "")) for n in re.search(r"stock ([\d,]+) B, slim ([\d,]+) B", inspected).groups()
    )

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # a user's setting that would override the budget
    result = run_demo()
    out = capsys.readouterr().out
    assert "VLLM_CPU_KVCACHE_SPACE unset for the demo" in out
    assert result.slim.layout == served_layout and result.stock.layout is None

    def whole_blocks(served, per_token: int) -> int:
        return KV_CACHE_BYTES // (per_token * served.block_size) * served.block_size

    # the budget, not the machine's free memory, sizes both caches (slim's value maps come out of it)
    assert result.stock.tokens == whole_blocks(result.stock, stock_per_token)
    assert 0.99 * whole_blocks(result.slim, slim_per_token) <= result.slim.tokens <= whole_blocks(result.slim, slim_per_token)
    printed = float(re.search(r"slim holds ([\d.]+)x the tokens of the stock backend", out).group(1))
    assert printed == round(result.capacity_ratio, 2)
    assert printed >= 1.9, "the README's capacity claim for the bundled model"

    agreed = result.tokens_agreed
    if agreed == MAX_TOKENS:
        assert f"Both backends gave the same {MAX_TOKENS} greedy tokens." in out
    else:
        assert f"agree on the first {agreed} of {MAX_TOKENS} tokens" in out
    assert agreed >= 8, "bf16 slim should follow stock's greedy path well past the first tokens"
