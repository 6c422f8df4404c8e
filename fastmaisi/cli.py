"""The `fastmaisi` command: dispatches each subcommand to its module's `*_main(argv) -> int` (imported lazily).

Thin by design: every subcommand parses its own arguments and calls one library function, so `--help` and bad-input
errors answer before torch is imported.
"""

from __future__ import annotations

import importlib
import sys

from fastmaisi import __version__

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "generate": ("fastmaisi.pipelines.generate_cli", "generate_main", "generate volumes (image only, from a mask, or paired)"),
    "index": ("fastmaisi.dataset_index", "index_main", "write index.csv of a generated dataset (one row per sample)"),
    "convert": ("fastmaisi.weights", "convert_main", "convert an official MAISI checkpoint to safetensors (+ JSON)"),
    "phantom": ("fastmaisi.phantom", "phantom_main", "write a dataset of procedural CT phantoms with labels"),
    "train": ("fastmaisi.train.cli", "train_main", "train vae | diffusion | controlnet | mask-vae | mask-diffusion"),
    "encode": ("fastmaisi.train.cli", "encode_main", "encode images to latents (+ sidecar JSON) for diffusion training"),
    "eval": ("fastmaisi.evaluation.cli", "eval_main", "evaluate: 2.5D FID, VAE reconstruction, HU quality check"),
    "labels": ("fastmaisi.segmentations.cli", "labels_main",
               "TotalSegmentator / NV-Segment / VISTA3D label maps -> MAISI ids (convert, list)"),
    "bench": ("fastmaisi.bench", "bench_main", "time and memory of ours vs the MONAI reference on this GPU"),
    "app": ("fastmaisi.app.cli", "app_main", "a local web page: plan, generate, view and download volumes"),
}


def _usage() -> str:
    lines = [f"fastmaisi {__version__}", "", "usage: fastmaisi COMMAND [options]   (fastmaisi COMMAND --help)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"fastmaisi {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastmaisi: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        entry = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:  # a command whose module is not built yet / optional dependency
        print(f"fastmaisi {name}: not available in this installation ({exc})", file=sys.stderr)
        return 2
    return int(entry(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
