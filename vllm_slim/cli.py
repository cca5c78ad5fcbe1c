"""`vllm-slim`: serve (a `vllm serve` that works with the CPU build too) and demo."""

import argparse
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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from vllm_slim.demo import run_demo

        run_demo()


if __name__ == "__main__":
    main()
