"""`fastmaisi generate`: parse, validate, call `generate`, print. Exit code 2 with one line on bad input."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings

from fastmaisi.argtypes import positive_int as _positive_int
from fastmaisi.pipelines.shards import parse_shard
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
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a different request in the output folder (a rerun of the same "
                        "request resumes without it: complete samples are kept, missing ones made)")
    p.add_argument("--manifest", metavar="FILE",
                   help="CSV or JSON Lines, one sample per row (seed, workflow, mask, organ sizes, size, spacing, "
                        "modality, steps, guidance, name, ...); see docs/datasets.md")
    p.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="make samples i with i mod N = I (default: from torchrun ranks and Slurm array tasks)")
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
        overwrite=args.overwrite, fmt=args.format, sampler=args.sampler,
        cuda_graphs=args.cuda_graphs)


EXIT_QUALITY_FAILED = 3  # every sample written, but some failed the quality check after retries (see index.csv)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGTERM: 143): complete samples kept, temporaries removed; rerun to finish


def _print_sample(result: dict) -> None:
    """One stdout line per sample as it is written, so a caller can follow a long job."""
    from tqdm.auto import tqdm

    record = result["record"]
    qc = record["quality_check"]
    status = "" if qc is None else (" quality check passed" if qc["passed"] else " quality check FAILED")
    tqdm.write(f"wrote {result['paths']['image']} (seed {record['seed']}, retries {record['retries']}){status}",
               file=sys.stdout)
    sys.stdout.flush()


def generate_main(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage mistake (2, already reported in one line)
        return int(exc.code or 0)
    from fastmaisi.pipelines.generate import generate

    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    previous = _on_sigterm(_terminated)  # a scheduler's stop (Slurm preemption) ends like Ctrl-C
    try:
        request = request_from_args(args)
        results = generate(request, progress=not args.quiet, dry_run=args.dry_run, manifest=args.manifest,
                           shard=args.shard, on_sample=_print_sample)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        print(f"fastmaisi generate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
        print(f"fastmaisi generate: interrupted; complete samples are kept in {args.output}, temporary files were "
              "removed; run the same command again to finish", file=sys.stderr)
        return code
    finally:
        _on_sigterm(previous)
    if not results:
        return 0
    failed = [r for r in results if (r["record"].get("quality_check") or {}).get("passed") is False]
    kept = sum(r["kept"] for r in results)
    print(json.dumps({"outputs": len(results), "made": len(results) - kept, "kept": kept,
                      "quality_check_failed": len(failed)}))
    if failed:
        print(f"fastmaisi generate: {len(failed)} of {len(results)} samples failed the quality check after retries "
              f"(written; see index.csv): {', '.join(r['paths']['image'].name for r in failed[:5])}",
              file=sys.stderr)
        return EXIT_QUALITY_FAILED
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


def _on_sigterm(handler):
    """Install a SIGTERM handler (main thread only; elsewhere nothing); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, TypeError):
        return None


def _terminated(signum, frame):
    raise _Terminated()
