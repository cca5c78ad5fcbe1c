"""`vllm-slim`: serve (a `vllm serve` that works with the CPU build too), inspect and demo."""

import argparse
import json
import os
import sys


def serve(argv: list[str]) -> None:
    """`vllm-slim serve MODEL [vLLM server args]` == `vllm serve MODEL ...`."""
    from vllm_slim.serving import api_server_command

    if not argv or argv[0].startswith("-"):
        sys.exit("usage: vllm-slim serve MODEL [vllm serve arguments, e.g. --attention-backend slim]")
    command = api_server_command(argv[0], argv[1:])
    os.execv(command[0], command)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="vllm-slim")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the stock OpenAI server (vllm serve equivalent)")
    sub.add_parser("demo", help="serve the bundled small MHA model with slim and stock, compare")
    add_inspect_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from vllm_slim.demo import run_demo

        run_demo()
    elif args.command == "inspect":
        run_inspect(args, parser)


def add_inspect_parser(sub) -> None:
    from vllm_slim.inspection import DTYPES, KV_CACHE_DTYPES

    inspect_parser = sub.add_parser(
        "inspect", help="per layer: whether slim applies, cond(W_K), predicted V error, layout; sata state sizes",
        description="Read a model directory (config.json + safetensors, no vLLM engine) and print what "
        "--attention-backend slim and sata would do with it. The options mean what they mean to vllm serve.",
    )
    inspect_parser.add_argument("model_dir", help="a Hugging Face model directory with safetensors weights")
    inspect_parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    inspect_parser.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES)
    inspect_parser.add_argument(
        "--additional-config", default="{}", type=json.loads,
        help='slim and sata options, e.g. \'{"slim": {"max_error_ratio": 2}, "sata": {"order": 5}}\'',
    )


def run_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`vllm-slim inspect MODEL_DIR`: the table, or a one-line error for a directory it cannot read."""
    from vllm_slim.inspection import format_report, inspect_model

    try:
        report = inspect_model(args.model_dir, args.dtype, args.kv_cache_dtype, args.additional_config)
    except (OSError, ValueError) as error:  # read_shape and Checkpoint name what they could not read
        parser.exit(2, f"vllm-slim inspect: {error}\n")
    except Exception as error:  # a checkpoint no reader here understands: say so, never a traceback
        parser.exit(2, f"vllm-slim inspect: could not read {args.model_dir}: {type(error).__name__}: {error}\n")
    print(format_report(report))


if __name__ == "__main__":
    main()
