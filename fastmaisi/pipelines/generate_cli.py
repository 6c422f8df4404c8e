"""`fastmaisi generate`: parse, validate, call `generate`, print. Exit code 2 with one line on bad input."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from fastmaisi.argtypes import positive_int as _positive_int
from fastmaisi.variants import VARIANTS


def _organ_size(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--organ-size {text!r}: expected NAME=FRACTION, e.g. liver=0.5")
    try:
        return name.strip().replace("_", " "), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--organ-size {text!r}: {value!r} is not a number") from None




class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (exit 2) instead of usage + message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastmaisi generate", description=(
        "Generate CT/MR volumes: image only (default), from a label map (--mask), or paired mask+image "
        "(--organ-size). Writes int16 NIfTI + label + JSON record + preview PNG per sample. Without --weights: the "
        "built-in demo networks, paired workflow."))
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--variant", choices=[*VARIANTS, "demo"],
                   help="default: rflow-ct with --weights; without --weights the built-in demo (64^3, CPU-sized)")
    p.add_argument("--weights", help="folder with the official MAISI .pt files or converted .safetensors")
    p.add_argument("--network-config", help="official config_network_*.json (default: built-in definitions)")
    p.add_argument("--size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="voxel size in mm")
    p.add_argument("--modality", help="name or code from the official modality mapping (ct, mri_t1, 9, ...)")
    p.add_argument("--body-region", nargs=2, metavar=("TOP", "BOTTOM"), default=("chest", "abdomen"),
                   help="ddpm-ct only: head, chest, abdomen or pelvis")
    p.add_argument("--mask", help="label map (NIfTI or DICOM folder) in the MAISI vocabulary: image-from-mask")
    p.add_argument("--mask-db", help="folder of candidate label maps: the best-fitting one per sample, the next on "
                   "each quality-check retry (the reference's mask database path)")
    p.add_argument("--strict-mask", action="store_true", help="refuse a mask without the body label 200")
    p.add_argument("--organ-size", type=_organ_size, action="append", default=[], metavar="NAME=FRACTION",
                   help="paired workflow: organ size in [0,1] or -1 (repeatable)")
    p.add_argument("--workflow", choices=["image", "from-mask", "paired"], help="default: from the options given")
    p.add_argument("--steps", type=_positive_int, help="sampling steps (default: the variant's)")
    p.add_argument("--mask-steps", type=_positive_int,
                   help="mask DM steps: 1000 = the reference's DDPM, fewer = DDIM at eta 1 (default 1000; demo 100)")
    p.add_argument("--sampler", choices=["euler", "ab2"], default="euler",
                   help="euler: the reference's; ab2: 2nd-order, more accurate per step (rflow only, not bit-compatible)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="launch every step's kernels from Python instead of replaying a CUDA graph (same result; "
                        "latents above 2x64^3 voxels run eagerly anyway)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--max-retries", type=int, default=2, help="quality-check retries with a new seed")
    p.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--memory-budget-gb", type=float, help="GPU memory the decode may use (default: what is free)")
    p.add_argument("--decode-devices", type=lambda s: tuple(d.strip() for d in s.split(",") if d.strip()),
                   help="split the exact decode along D over these devices, e.g. cuda:0,cuda:1 (budget per device)")
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--from-record", help="reproduce the volume of a JSON record written by an earlier run")
    p.add_argument("--dry-run", action="store_true", help="print the memory and time plan, write nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def request_from_args(args):
    from fastmaisi.pipelines.generate import GenerateRequest

    if args.from_record:
        from fastmaisi.io import read_record

        saved = dict(read_record(args.from_record)["request"])
        saved.update(output_dir=args.output, overwrite=args.overwrite)
        if args.weights:
            saved["weights"] = args.weights
        saved["num_samples"], saved["seed"] = 1, read_record(args.from_record)["seed"]
        saved["max_retries"] = 0
        return GenerateRequest(**saved)
    return GenerateRequest(
        output_dir=args.output, variant=args.variant, weights=args.weights, network_config=args.network_config,
        size=tuple(args.size) if args.size else None, spacing=tuple(args.spacing) if args.spacing else None,
        modality=args.modality, body_region=tuple(args.body_region), mask=args.mask, mask_db=args.mask_db, strict_mask=args.strict_mask,
        organ_sizes=dict(args.organ_size), workflow_name=args.workflow, steps=args.steps, mask_steps=args.mask_steps,
        guidance_scale=args.guidance_scale, seed=args.seed, num_samples=args.num_samples,
        max_retries=args.max_retries, device=args.device, memory_budget_gb=args.memory_budget_gb,
        decode_devices=args.decode_devices,
        overwrite=args.overwrite, fmt=args.format, sampler=args.sampler,
        cuda_graphs=args.cuda_graphs)


def generate_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage mistake (2, already reported in one line)
        return int(exc.code or 0)
    from fastmaisi.pipelines.generate import generate

    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    try:
        request = request_from_args(args)
        results = generate(request, progress=not args.quiet, dry_run=args.dry_run)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"fastmaisi generate: {exc}", file=sys.stderr)
        return 2
    for r in results:
        qc = r["record"]["quality_check"]
        status = "" if qc is None else (" quality check passed" if qc["passed"] else " quality check FAILED")
        print(f"wrote {r['paths']['image']} (seed {r['record']['seed']}, retries {r['record']['retries']}){status}")
    if results:
        print(json.dumps({"outputs": len(results)}))
    return 0
