"""SATA's quality on trained models, offline: how far the truncated series (and a hybrid with exact sink and
recent keys) moves attention, perplexity and retrieval away from exact softmax.

    .venv/bin/python -m benchmarks.sata_quality [--small-head-model DIR]

The models run in transformers with their attention replaced by the reference forms (quadratic, float32,
no server): `vllm_slim.fixtures.sata_reference` for softmax and SATA, `naive_hybrid_sata_attention` for the
hybrid. Prints every table and writes benchmarks/results/sata_quality.md with PNG plots beside it.
"""

import argparse
import datetime
import itertools
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from matplotlib.figure import Figure  # no pyplot: files only, whatever the display
from tokenizers import Tokenizer
from transformers import AttentionInterface, AutoModelForCausalLM

from vllm_slim.fixtures.sata_reference import load_reference
from vllm_slim.fixtures.tokenizer import read_source, stdlib_sources
from vllm_slim.fixtures.train import SHAPE, token_windows
from vllm_slim.ops.sata import naive_softmax_attention, truncated_exp
from vllm_slim.ops.sata.basis import is_positive_order
from vllm_slim.ops.sata.hybrid import hybrid_weights
from vllm_slim.ops.sata.policy import break_even_tokens, sequence_state_bytes, stock_bytes_per_token

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "vllm_slim" / "fixtures" / "trained" / "tiny-llama-pysrc"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

HEAD_STATS_TOKENS = 512
CONTEXT_LENGTHS = (64, 128, 256, 512, 1024)
WINDOWS_PER_LENGTH = 8
NEEDLE_LENGTHS = (128, 256, 512, 1024)
NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_TRIALS = 8  # random values per (length, depth)
NEEDLE_QUERY = '\nassert SECRET_TOKEN == "'
NEEDLE_ALPHABET = "abcdefghjkmnpqrstuvwxyz"
SEED = 0


@dataclass(frozen=True)
class Mode:
    """How a key is weighted: exact softmax (order None), the truncated series, or the hybrid of both."""

    order: int | None = None
    sink_tokens: int = 0
    window: int = 0

    @property
    def hybrid(self) -> bool:
        return self.order is not None and (self.sink_tokens > 0 or self.window > 0)

    @property
    def name(self) -> str:
        if self.order is None:
            return "softmax"
        if self.hybrid:
            return f"hybrid o{self.order} S{self.sink_tokens} W{self.window}"
        return f"sata o{self.order}"


SOFTMAX = Mode()
SATA_MODES = (Mode(1), Mode(3), Mode(5))
HYBRID_MODES = (Mode(3, 4, 32), Mode(3, 4, 128))
MODES = (SOFTMAX, *SATA_MODES, *HYBRID_MODES)
APPROXIMATE_MODES = MODES[1:]
# Needle columns: "no needle" is softmax on the prompt without the needle line.
NEEDLE_COLUMNS = ("softmax", "no needle", *(m.name for m in APPROXIMATE_MODES))
COLORS = {name: f"C{i}" for i, name in enumerate(NEEDLE_COLUMNS)}  # one color per mode in every plot


def load(model_dir: Path, mode: Mode):
    return load_reference(model_dir, mode.order, sink_tokens=mode.sink_tokens, window=mode.window)


class Progress:
    def __init__(self):
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", flush=True)


# --- attention fidelity per layer and head, from captured q, k, v ---


@torch.no_grad()
def capture_qkv(model_dir: Path, token_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Per layer: post-RoPE q [H, T, d], k and v [Hkv, T, d] (float64) and the scale, from one exact-softmax pass."""
    captured = {}

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        captured[module.layer_idx] = (query[0].double(), key[0].double(), value[0].double(), scaling)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
        return naive_softmax_attention(q, k, v, scaling)[None], None

    AttentionInterface.register("sata_quality_capture", attend)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sata_quality_capture"
    )
    model.eval()(torch.tensor([token_ids]))
    return [captured[layer] for layer in sorted(captured)]


def attention_rows(logits: torch.Tensor, mode: Mode) -> torch.Tensor:
    """Normalized causal attention rows [H, T, T] of `mode` for logits [H, T, T], as the reference forms weight."""
    causal = torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    if mode.order is None:
        return logits.masked_fill(~causal, float("-inf")).softmax(-1)
    if mode.hybrid:
        weights = hybrid_weights(logits, mode.order, mode.sink_tokens, mode.window)
    else:
        weights = truncated_exp(logits, mode.order).masked_fill(~causal, 0)
    return weights / weights.sum(-1, keepdim=True)


def head_fidelity(layers) -> list[dict]:
    """One row per (layer, head): logit range over causal pairs, and each mode's errors against softmax."""
    rows = []
    for layer, (q, k, v, scale) in enumerate(layers):
        group = q.shape[0] // k.shape[0]  # consecutive query heads share a KV head
        keys, values = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        logits = torch.einsum("htd,hsd->hts", q, keys) * scale
        pairs = logits[:, torch.ones(logits.shape[-2:], dtype=torch.bool).tril()]
        exact = attention_rows(logits, SOFTMAX)
        exact_out = exact @ values
        errors = {}
        for mode in APPROXIMATE_MODES:
            approximate = attention_rows(logits, mode)
            errors[mode] = (
                (approximate @ values - exact_out).norm(dim=(1, 2)) / exact_out.norm(dim=(1, 2)),
                0.5 * (approximate - exact).abs().sum(-1).mean(-1),  # mean over query rows of the TV distance
            )
        for head in range(q.shape[0]):
            row = {
                "layer": layer, "head": head, "min": pairs[head].min().item(), "max": pairs[head].max().item(),
                "std": pairs[head].std().item(), "peak": exact[head].amax(-1).mean().item(),
            }
            for mode, (relative_l2, tv) in errors.items():
                row[("rel", mode)] = relative_l2[head].item()
                row[("tv", mode)] = tv[head].item()
            rows.append(row)
    return rows


# --- teacher-forced perplexity by context length ---


@torch.no_grad()
def context_sweep(model_dir: Path, tokenizer: Tokenizer, progress: Progress) -> dict:
    """{(mode, length): {ppl, dlogp, agree}} over the last half of each held-out window of `length` tokens."""
    windows = {}
    for length in CONTEXT_LENGTHS:
        all_windows = token_windows(tokenizer, stdlib_sources("validation"), length)
        picks = torch.linspace(0, len(all_windows) - 1, WINDOWS_PER_LENGTH).round().long()
        windows[length] = all_windows[picks]
    results, reference = {}, {}
    for mode in MODES:
        model = load(model_dir, mode)
        for length, batch in windows.items():
            scored = length // 2  # tokens with at least length/2 tokens of context
            logits = model(batch).logits[:, -scored - 1 : -1].float()
            logprobs = logits.log_softmax(-1).gather(-1, batch[:, -scored:, None])[..., 0]
            top = logits.argmax(-1)
            if mode == SOFTMAX:
                reference[length] = logprobs, top
            exact_logprobs, exact_top = reference[length]
            results[mode, length] = {
                "ppl": math.exp(-logprobs.mean().item()),
                "dlogp": (logprobs - exact_logprobs).abs().mean().item(),
                "agree": (top == exact_top).float().mean().item(),
            }
        progress(f"  context sweep: {mode.name} done")
    return results


# --- needle in a haystack ---


@dataclass
class NeedleCase:
    length: int
    depth: float
    prompt: list[int]
    control: list[int]  # the same prompt without the needle line
    target: list[int]  # the value's tokens, then the closing quote's
    value_tokens: int


def needle_cases(tokenizer: Tokenizer) -> list[NeedleCase]:
    """Held-out source lines as filler, `SECRET_TOKEN = "<value>"` planted at a line boundary at `depth` of it."""
    lines = "".join(read_source(p) for p in stdlib_sources("validation")).splitlines(keepends=True)
    line_tokens = [len(tokenizer.encode(line, add_special_tokens=False).ids) for line in lines]
    tokens_after = list(itertools.accumulate(reversed(line_tokens)))[::-1]  # tokens from line i to the end
    query_tokens = len(tokenizer.encode(NEEDLE_QUERY, add_special_tokens=False).ids)
    rng = random.Random(SEED)
    cases = []
    for length, depth, _ in itertools.product(NEEDLE_LENGTHS, NEEDLE_DEPTHS, range(NEEDLE_TRIALS)):
        value = "".join(rng.choice(NEEDLE_ALPHABET) for _ in range(rng.randint(4, 6)))
        needle = f'SECRET_TOKEN = "{value}"\n'
        budget = length - 1 - len(tokenizer.encode(needle, add_special_tokens=False).ids) - query_tokens
        start = rng.choice([i for i, after in enumerate(tokens_after) if after >= budget])
        end, filler = start, 0
        while filler < budget:  # whole lines, so the length comes out a few tokens over or under
            filler, end = filler + line_tokens[end], end + 1
        cut, before = start, 0
        while before + line_tokens[cut] <= depth * filler:
            before, cut = before + line_tokens[cut], cut + 1
        before_text, after_text = "".join(lines[start:cut]), "".join(lines[cut:end])
        prompt = tokenizer.encode(before_text + needle + after_text + NEEDLE_QUERY).ids
        full = tokenizer.encode(before_text + needle + after_text + NEEDLE_QUERY + value + '"').ids
        value_ids = tokenizer.encode(value, add_special_tokens=False).ids
        assert full[: len(prompt)] == prompt and full[len(prompt) :][: len(value_ids)] == value_ids
        control = tokenizer.encode(before_text + after_text + NEEDLE_QUERY).ids
        cases.append(NeedleCase(length, depth, prompt, control, full[len(prompt) :], len(value_ids)))
    return cases


@torch.no_grad()
def needle_score(model, prompt: list[int], target: list[int], value_tokens: int) -> tuple[bool, float, float]:
    """(greedy decoding reproduces the value and its closing quote, Σ log p of the value's tokens, share of
    the value's tokens that are the argmax given the true ones before them).

    Greedy decoding emits `target` exactly when each teacher-forced argmax along it is the target token,
    so one pass over prompt + target decides it.
    """
    logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1].float()
    logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(target)[:, None])[:, 0]
    hits = logits.argmax(-1) == torch.tensor(target)
    return bool(hits.all()), logprobs[:value_tokens].sum().item(), hits[:value_tokens].float().mean().item()


def needle_sweep(model_dir: Path, tokenizer: Tokenizer, progress: Progress) -> tuple[list[NeedleCase], dict]:
    """{(mode name, case index): (success, log-prob, token accuracy)}; "no needle" is softmax on the controls."""
    cases = needle_cases(tokenizer)
    results = {}
    for mode in MODES:
        model = load(model_dir, mode)
        for index, case in enumerate(cases):
            results[mode.name, index] = needle_score(model, case.prompt, case.target, case.value_tokens)
            if mode == SOFTMAX:
                results["no needle", index] = needle_score(model, case.control, case.target, case.value_tokens)
        progress(f"  needle: {mode.name} done")
    return cases, results


# --- state size ---


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024


def state_table() -> tuple[list[str], list[list[str]]]:
    """Per order: state bytes per sequence and the break-even context against a bf16 KV cache, per model shape."""
    shapes = {  # (layers, KV heads, head size)
        "fixture (4 × 8 × 32)": (SHAPE["num_layers"], SHAPE["num_heads"], SHAPE["hidden_size"] // SHAPE["num_heads"]),
        "small-head (4 × 16 × 16)": (SHAPE["num_layers"], 16, SHAPE["hidden_size"] // 16),
        "Llama-2-7B shape (32 × 32 × 128)": (32, 32, 128),
    }
    header = ["order", "weights > 0"]
    for name in shapes:
        header += [f"{name}: state / sequence", "break-even tokens"]
    rows = []
    for order in range(1, 6):
        row = [str(order), "yes" if is_positive_order(order) else "no"]
        for layers, heads, head_size in shapes.values():
            row.append(human_bytes(sequence_state_bytes([(heads, head_size, head_size)] * layers, order)))
            row.append(f"{break_even_tokens(heads, head_size, head_size, torch.bfloat16, order):,}")
        rows.append(row)
    return header, rows


# --- report ---


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def layer_summary(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["layer", "logit min", "logit max", "mean logit std", "mean softmax peak"]
    header += [f"rel L2 {m.name}" for m in APPROXIMATE_MODES] + [f"TV {m.name}" for m in APPROXIMATE_MODES]
    table = []
    for layer in sorted({r["layer"] for r in rows}):
        heads = [r for r in rows if r["layer"] == layer]
        line = [layer, f"{min(r['min'] for r in heads):.1f}", f"{max(r['max'] for r in heads):.1f}",
                f"{sum(r['std'] for r in heads) / len(heads):.2f}", f"{sum(r['peak'] for r in heads) / len(heads):.2f}"]
        for kind in ("rel", "tv"):
            line += [f"{sum(r[kind, m] for r in heads) / len(heads):.3f}" for m in APPROXIMATE_MODES]
        table.append(line)
    return header, table


def head_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    header = ["layer", "head", "logit min", "max", "std", "softmax peak"]
    header += [f"rel L2 {m.name}" for m in APPROXIMATE_MODES] + [f"TV {m.name}" for m in APPROXIMATE_MODES]
    table = []
    for r in rows:
        line = [r["layer"], r["head"], f"{r['min']:.1f}", f"{r['max']:.1f}", f"{r['std']:.2f}", f"{r['peak']:.2f}"]
        line += [f"{r['rel', m]:.3f}" for m in APPROXIMATE_MODES] + [f"{r['tv', m]:.3f}" for m in APPROXIMATE_MODES]
        table.append(line)
    return header, table


def context_table(results: dict) -> tuple[list[str], list[list]]:
    header = ["context", "softmax ppl"]
    for m in APPROXIMATE_MODES:
        header += [f"{m.name} ppl", "mean abs Δ log p", "top-1 agree"]
    table = []
    for length in CONTEXT_LENGTHS:
        line = [length, f"{results[SOFTMAX, length]['ppl']:.2f}"]
        for m in APPROXIMATE_MODES:
            r = results[m, length]
            line += [f"{r['ppl']:.2f}", f"{r['dlogp']:.3f}", f"{r['agree']:.1%}"]
        table.append(line)
    return header, table


def needle_tables(cases: list[NeedleCase], results: dict) -> tuple[list[str], list[list[list]]]:
    """Per (length, depth), one column per mode: successes, mean value log-prob, mean token accuracy."""
    header = ["length (mean tokens)", "depth", *NEEDLE_COLUMNS]
    tables = [[], [], []]
    for length, depth in itertools.product(NEEDLE_LENGTHS, NEEDLE_DEPTHS):
        indices = [i for i, c in enumerate(cases) if c.length == length and c.depth == depth]
        mean_tokens = sum(len(cases[i].prompt) for i in indices) / len(indices)
        key = [f"{length} ({mean_tokens:.0f})", f"{depth:.0%}"]
        tables[0].append(key + [f"{sum(results[n, i][0] for i in indices)}/{len(indices)}" for n in NEEDLE_COLUMNS])
        tables[1].append(key + [f"{sum(results[n, i][1] for i in indices) / len(indices):.1f}" for n in NEEDLE_COLUMNS])
        tables[2].append(key + [f"{sum(results[n, i][2] for i in indices) / len(indices):.0%}" for n in NEEDLE_COLUMNS])
    return header, tables


def plot_heads(head_rows: dict[str, list[dict]], path: Path) -> None:
    figure = Figure(figsize=(6 * len(head_rows), 4.5))
    axes = figure.subplots(1, len(head_rows), squeeze=False)
    for axis, (label, rows) in zip(axes[0], head_rows.items()):
        for m in APPROXIMATE_MODES:
            errors = [r["rel", m] for r in rows]
            axis.scatter([r["std"] for r in rows], errors, label=m.name, s=14, color=COLORS[m.name])
        axis.set(xlabel="logit std over causal pairs (per head)", ylabel="relative L2 error of the head output",
                 yscale="log", title=label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_context(context: dict[str, dict], path: Path) -> None:
    figure = Figure(figsize=(6 * len(context), 8))
    axes = figure.subplots(2, len(context), squeeze=False)
    for column, (label, results) in enumerate(context.items()):
        for m in MODES:
            style = {"label": m.name, "color": COLORS[m.name]}
            axes[0, column].plot(CONTEXT_LENGTHS, [results[m, n]["ppl"] for n in CONTEXT_LENGTHS], "o-", **style)
            if m != SOFTMAX:
                axes[1, column].plot(CONTEXT_LENGTHS, [results[m, n]["dlogp"] for n in CONTEXT_LENGTHS], "o-", **style)
        axes[0, column].set(xscale="log", yscale="log", ylabel="perplexity (last half of window)", title=label)
        axes[1, column].set(xscale="log", yscale="log", xlabel="context length (tokens)",
                            ylabel="mean |Δ log p| vs softmax (nats)")
        for axis in axes[:, column]:
            axis.minorticks_off()
            axis.set_xticks(CONTEXT_LENGTHS, [str(n) for n in CONTEXT_LENGTHS])
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def plot_needle(cases: list[NeedleCase], results: dict, path: Path) -> None:
    figure = Figure(figsize=(12, 4.5))
    axes = figure.subplots(1, 2)
    for name in NEEDLE_COLUMNS:
        for axis, metric in zip(axes, (0, 2)):
            rates = []
            for length in NEEDLE_LENGTHS:
                indices = [i for i, c in enumerate(cases) if c.length == length]
                rates.append(sum(results[name, i][metric] for i in indices) / len(indices))
            axis.plot(NEEDLE_LENGTHS, rates, "o-", label=name, color=COLORS[name])
    for axis, ylabel in zip(axes, ("greedy success (value and quote)", "teacher-forced token accuracy")):
        axis.set(xscale="log", xlabel="prompt length (tokens)", ylabel=f"{ylabel}, all depths", ylim=(-0.05, 1.05),
                 title="needle: SECRET_TOKEN recalled, fixture model")
        axis.minorticks_off()
        axis.set_xticks(NEEDLE_LENGTHS, [str(n) for n in NEEDLE_LENGTHS])
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def training_summary(model_dir: Path) -> str:
    """The run-describing rows of the model's TRAINING.md (written by vllm_slim.fixtures.train)."""
    text = (model_dir / "TRAINING.md").read_text()
    command = text.split("```")[1].strip()
    keep = ("| wall time", "| steps", "| final val loss")
    return f"`{command}`\n\n| | |\n|---|---|\n" + "\n".join(
        line for line in text.splitlines() if line.startswith(keep)
    )


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-head-model", type=Path, help="a model dir trained with --num-heads 16 (d_h = 16)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    runner = ["-m", __spec__.name] if __spec__ else [sys.argv[0]]
    command = shlex.join([os.path.relpath(sys.executable), *runner, *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    load_average = os.getloadavg()[0]
    progress = Progress()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_file(str(FIXTURE_DIR / "tokenizer.json"))

    models = {"fixture (8 heads of 32)": FIXTURE_DIR}
    if args.small_head_model:
        models["small-head (16 heads of 16)"] = args.small_head_model
    middle = token_windows(tokenizer, stdlib_sources("validation"), HEAD_STATS_TOKENS)
    head_ids = middle[len(middle) // 2].tolist()
    head_rows, context = {}, {}
    for label, model_dir in models.items():
        progress(f"{label}: capturing q, k, v over {HEAD_STATS_TOKENS} held-out tokens")
        head_rows[label] = head_fidelity(capture_qkv(model_dir, head_ids))
        print(markdown_table(*layer_summary(head_rows[label])), flush=True)
        progress(f"{label}: perplexity by context length")
        context[label] = context_sweep(model_dir, tokenizer, progress)
        print(markdown_table(*context_table(context[label])), flush=True)
    progress("fixture: needle in a haystack")
    cases, needle = needle_sweep(FIXTURE_DIR, tokenizer, progress)
    needle_header, (needle_success, needle_logprob, needle_accuracy) = needle_tables(cases, needle)
    for table in (needle_success, needle_logprob, needle_accuracy):
        print(markdown_table(needle_header, table))
    state_header, state_rows = state_table()
    print(markdown_table(state_header, state_rows), flush=True)

    plot_heads(head_rows, RESULTS_DIR / "sata_quality_heads.png")
    plot_context(context, RESULTS_DIR / "sata_quality_context.png")
    plot_needle(cases, needle, RESULTS_DIR / "sata_quality_needle.png")
    wall = time.monotonic() - progress.started
    progress("plots written")

    sections = [f"""# SATA quality, offline

Generated by `benchmarks/sata_quality.py`; do not edit by hand.

```
{command}
```

| | |
|---|---|
| date (UTC) | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} |
| machine | {platform.platform()}, {cpu_name()}, {os.cpu_count()} CPUs \
(1-min load average at start {load_average:.1f}) |
| software | Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, \
{torch.get_num_threads()} torch thread(s) |
| wall time | {wall / 60:.1f} min |

**What runs.** Each model runs in transformers (float32) with its attention function replaced:
`softmax` is exact causal softmax and `sata oP` SATA's definition with P Taylor terms (degrees 0..P−1,
`naive_sata_attention` via `vllm_slim.fixtures.sata_reference`); `hybrid oP S<s> W<w>` is
`naive_hybrid_sata_attention`: exact exp(x) weights for the first S tokens and the W most recent ones (the
query included), the order-P series for all older keys, one normalizer over both. These are the quadratic
reference forms: what the basis-based state computes, without its float32 state arithmetic.

**Models.** The fixture `tiny-llama-pysrc` (4 layers, 8 heads of 32, RoPE, trained on 256-token windows, so
positions past 256 are RoPE extrapolation for every mode). Held-out text: the stdlib's
`json/`, `shlex.py`, `textwrap.py`, never trained on."""]
    if args.small_head_model:
        sections.append(f"""The small-head variant (same width, 16 heads of 16, `{args.small_head_model}`, not
committed) was trained with a much smaller budget than the fixture, so its perplexities are not comparable
with the fixture's; compare each model's modes against its own softmax only.

{training_summary(args.small_head_model)}""")
    else:
        sections.append("The small-head variant (16 heads of 16) was not measured in this run (no --small-head-model).")
    for label in models:
        sections.append(f"""## Attention fidelity per layer: {label}

One exact-softmax pass over {HEAD_STATS_TOKENS} held-out tokens (the middle window of the held-out stream)
captures each layer's post-RoPE q, k, v; the rest is computed from them in float64. Logit x = q·k·scale over
causal pairs; softmax peak is the mean over queries of the largest softmax weight (1 = one key takes all).
rel L2: ‖o − o_softmax‖ / ‖o_softmax‖ over the head's outputs at all positions; TV: total-variation
distance between the mode's and softmax's attention rows, averaged over queries. Means over heads per layer;
every head is listed in the appendix.

{markdown_table(*layer_summary(head_rows[label]))}""")
    for label in models:
        sections.append(f"""## Perplexity by context length: {label}

{WINDOWS_PER_LENGTH} windows of each length, evenly spaced over the held-out token stream (files as
`<s> source </s>`, as in training); scored are the last half of each window's tokens, so every scored token
sees at least half the length as context. Δ log p and top-1 agreement are per scored token against softmax.
Past the 256 training positions softmax's own perplexity climbs (RoPE extrapolation) and an approximate mode
can score below it there: that is a different failure, not fidelity; read Δ log p and top-1 agreement.

{markdown_table(*context_table(context[label]))}""")
    sections.append(f"""## Needle in a haystack: fixture

Filler: whole lines of held-out source from a random line on. At the line boundary nearest the given depth
(share of filler tokens before it) goes `SECRET_TOKEN = "<value>"`, the value {NEEDLE_TRIALS} random strings of
4–6 letters from `{NEEDLE_ALPHABET}` per cell (each letter is one token); the prompt ends with
`{NEEDLE_QUERY.strip()}`. Success: greedy decoding reproduces the value and its closing quote (decided from one
teacher-forced pass: greedy emits a sequence exactly when each step's argmax is its next token). Prompt
lengths come out within a line of the nominal length (mean shown). `no needle` is softmax on the same prompt
with the needle line removed: what the model scores without the information. Nominal lengths, depths and
values are the same for every column. A 4-layer model is a weak retriever: read the SATA and hybrid
columns against softmax's, not against 100%.

Successes:

{markdown_table(needle_header, needle_success)}

Mean log p of the value's tokens (nats, summed over the value; a uniform guess over the alphabet is
{math.log(1 / len(NEEDLE_ALPHABET)):.2f} per letter):

{markdown_table(needle_header, needle_logprob)}

Teacher-forced token accuracy: the share of the value's tokens that are the argmax given the true tokens
before them (guessing a letter at random: {1 / len(NEEDLE_ALPHABET):.0%}):

{markdown_table(needle_header, needle_accuracy)}""")
    head_size = SHAPE["hidden_size"] // SHAPE["num_heads"]
    fixture_token_bytes = SHAPE["num_layers"] * stock_bytes_per_token(
        SHAPE["num_heads"], head_size, head_size, torch.bfloat16
    )
    widest = HYBRID_MODES[-1]
    sections.append(f"""## State size per sequence

float32 state, numerator and normalizer, per KV head: (d_v + 1)·C(d + P − 1, P − 1) floats, summed over
layers and KV heads. Break-even: the context length from which the state is smaller than a bfloat16 KV cache
of the same sequence (`vllm_slim.ops.sata.policy.break_even_tokens`). Even orders end on an odd degree and
give negative weights below some logit (the policy refuses them). A hybrid adds the stock cache of S + W tokens
(the fixture's bf16 K and V: {human_bytes(fixture_token_bytes)} per token, so
{human_bytes((widest.sink_tokens + widest.window) * fixture_token_bytes)} for S = {widest.sink_tokens}, \
W = {widest.window}).

{markdown_table(state_header, state_rows)}

## Plots

- `sata_quality_heads.png`: per head, relative L2 error against the head's logit std.
- `sata_quality_context.png`: perplexity and mean |Δ log p| against context length.
- `sata_quality_needle.png`: needle success and token accuracy against prompt length (all depths together).""")
    for label in models:
        sections.append(f"""## Appendix: every head, {label}

{markdown_table(*head_table(head_rows[label]))}""")
    (RESULTS_DIR / "sata_quality.md").write_text("\n\n".join(sections) + "\n")
    progress(f"wrote {RESULTS_DIR / 'sata_quality.md'}")


if __name__ == "__main__":
    main()
