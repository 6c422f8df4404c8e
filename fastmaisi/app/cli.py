"""`fastmaisi app`: parse, check, serve. Bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastmaisi.variants import VARIANTS
from fastmaisi.argtypes import OneLineParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastmaisi app", description=(
        "A local web page to plan, generate, view and download volumes (all three workflows), over the same "
        "`generate` as the CLI. Without --weights: the built-in demo networks (toys, not real CT)."))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--weights", help="folder with the official MAISI .pt files or converted .safetensors")
    p.add_argument("--variant", choices=[*VARIANTS, "demo"], help="default: rflow-ct with --weights, else the demo")
    p.add_argument("--output-dir", default="fastmaisi-app-output", help="jobs write to OUTPUT_DIR/<job id>/")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("-q", "--quiet", action="store_true", help="no request log")
    return p


def app_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"fastmaisi app: needs FastAPI, uvicorn and python-multipart (missing: {', '.join(missing)}); "
              'pip install "fastmaisi[app]"', file=sys.stderr)
        return 2
    if args.weights and not Path(args.weights).is_dir():
        print(f"fastmaisi app: --weights {args.weights}: not a folder", file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print(f"fastmaisi app: --port {args.port}: must be in 1..65535", file=sys.stderr)
        return 2
    from fastmaisi.app.server import serve
    from fastmaisi.io import check_output_dir
    from fastmaisi.variants import get_variant

    try:
        get_variant(args.variant or ("rflow-ct" if args.weights else "demo"))
        _check_device(args.device)
        _check_port(args.host, args.port)
        check_output_dir(args.output_dir, [])
        serve(args.host, args.port, args.output_dir, args.weights, args.variant, args.device, quiet=args.quiet)
    except (ValueError, OSError) as exc:
        print(f"fastmaisi app: {exc}", file=sys.stderr)
        return 2
    return 0


def _check_device(name: str) -> None:
    import torch

    if name != "auto" and name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")


def _check_port(host: str, port: int) -> None:
    """Fail now, in one line, when the address is taken (uvicorn would log it and exit 1)."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
