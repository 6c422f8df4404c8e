"""`fastmaisi generate`: parse, validate, call `generate`, print. Exit code 2 with one line on bad input."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import warnings

from fastmaisi import argtypes
from fastmaisi.argtypes import positive_int as _positive_int
from fastmaisi.pipelines.shards import parse_shard
from fastmaisi.variants import VARIANTS
from fastmaisi.argtypes import OneLineParser


def _organ_size(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--organ-size {text!r}: expected NAME=FRACTION, e.g. liver=0.5")
    try:
        return name.strip().replace("_", " "), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--organ-size {text!r}: {value!r} is not a number") from None


def _demographic(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not value.strip():
        raise argparse.ArgumentTypeError(f"--demographic {text!r}: expected NAME=VALUE, e.g. age=55 or sex=F")
    return name.strip().lower(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fastmaisi generate", description=(
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
                   choices=("head", "chest", "abdomen", "pelvis"),
                   help="ddpm-ct image workflow only: head, chest, abdomen or pelvis")
    p.add_argument("--mask", nargs="+", metavar="SEG", help="image-from-mask: a label map (NIfTI, DICOM SEG, DICOM "
                   "folder) or TotalSegmentator's per-class folder; several are merged (docs/own-segmentation.md)")
    p.add_argument("--mask-vocabulary", default="auto", help="ids of --mask: auto (default; refuses when unsure), "
                   "maisi, total, total_v3, total_mr, nv_segment_ct, vista3d, ... (fastmaisi labels list)")
    p.add_argument("--mask-db", help="folder of candidate label maps: the best-fitting one per sample, the next on "
                   "each quality-check retry (the reference's mask database path)")
    p.add_argument("--strict-mask", action="store_true", help="refuse a mask without the body label 200")
    p.add_argument("--organ-size", type=_organ_size, action="append", default=[], metavar="NAME=FRACTION",
                   help="paired workflow: organ size in [0,1] or -1 (repeatable; v2: at most one, slots "
                        "liver spleen stomach pancreas colon left_kidney right_kidney lung gallbladder lung_tumor "
                        "pancreatic_tumor hepatic_tumor colon_cancer_primaries bone_lesion)")
    p.add_argument("--anatomy-size-db", metavar="FILE",
                   help="NVIDIA's all_anatomy_size_conditions.json: organ sizes not given come from its closest entry "
                        "(default: looked for in --weights, its datasets/ and ../datasets/; without it they stay -1)")
    p.add_argument("--mask-generator", choices=["v1", "v2"],
                   help="v1: DDPM mask DM (10 organ sizes); v2: NVIDIA's rflow-mask (one size target + "
                        "demographics). Default: v2 when mask_generation_diffusion_unet_v2 is in --weights, else v1")
    p.add_argument("--demographic", type=_demographic, action="append", default=[], metavar="NAME=VALUE",
                   help="v2 mask generator: age (years), sex (M/F), weight (kg), bmi or height (cm); repeatable")
    p.add_argument("--mask-guidance-scale", type=argtypes.finite_non_negative, help="v2 mask generator's guidance scale (default 2.0)")
    p.add_argument("--workflow", choices=["image", "from-mask", "paired"], help="default: from the options given")
    p.add_argument("--steps", type=_positive_int, help="sampling steps (default: the variant's)")
    p.add_argument("--mask-steps", type=_positive_int,
                   help="mask DM steps. v1: 1000 = the reference's DDPM, fewer = DDIM at eta 1 (default 1000; demo "
                        "100); v2: rectified-flow steps (default 100)")
    p.add_argument("--sampler", choices=["euler", "ab2"], default="euler",
                   help="euler: the reference's; ab2: 2nd-order, more accurate per step (rflow only, not bit-compatible)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="launch every step's kernels from Python instead of replaying a CUDA graph (same result; "
                        "latents above 2x64^3 voxels run eagerly anyway)")
    p.add_argument("--guidance-scale", type=argtypes.finite_non_negative,
                   help="classifier-free guidance scale (0: off) of the workflow")
    p.add_argument("--modality-guidance-scale", type=argtypes.finite_non_negative,
                   help="image-only workflow's guidance scale (NVIDIA cfg_guidance_scale_modality); wins over "
                        "--guidance-scale there")
    p.add_argument("--tumour-guidance-scale", "--tumor-guidance-scale", type=argtypes.finite_non_negative,
                   help="mask workflows' guidance scale (NVIDIA cfg_guidance_scale_tumor); wins over "
                        "--guidance-scale there")
    p.add_argument("--seed", type=argtypes.seed, default=0, help=f"0..{argtypes.SEED_MAX}")
    p.add_argument("--num-samples", type=_positive_int, default=1)
    p.add_argument("--max-retries", type=argtypes.non_negative_int, default=2,
                   help="quality-check retries with a new seed")
    p.add_argument("-d", "--device", type=argtypes.device, default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--memory-budget-gb", type=argtypes.positive_gib,
                   help="GPU memory the decode may use (default: what is free)")
    p.add_argument("--decode-devices", type=lambda s: tuple(d.strip() for d in s.split(",") if d.strip()),
                   help="split the exact decode along D over these devices, e.g. cuda:0,cuda:1 (budget per device)")
    p.add_argument("--format", choices=["nifti", "dicom"], default="nifti")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of a different request in the output folder (a rerun of the same "
                        "request resumes without it: complete samples are kept, missing ones made)")
    p.add_argument("--manifest", metavar="FILE",
                   help="CSV or JSON Lines, one sample per row (seed, workflow, mask, organ sizes, size, spacing, "
                        "modality, steps, guidance, name, ...); see docs/datasets.md")
    p.add_argument("--shard", type=parse_shard, metavar="I/N",
                   help="make samples i with i mod N = I (default: from torchrun ranks and Slurm array tasks)")
    p.add_argument("--from-record", help="reproduce the volume of a JSON record written by an earlier run (same name; "
                   "inputs' SHA-256 checked; flags that would change the volume are refused)")
    p.add_argument("--allow-changed-inputs", action="store_true",
                   help="--from-record: run even if the mask or a weight file differs from the record (recorded)")
    p.add_argument("--force", action="store_true",
                   help="start even if the memory or disk estimate says the run does not fit this machine")
    p.add_argument("--dry-run", action="store_true", help="print the memory and time plan and whether it fits, "
                   "write nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _absolute(path: str | None) -> str | None:
    """Input paths are recorded absolute, so that a record reproduces from any folder."""
    import os

    return None if path is None else os.path.abspath(path)


def request_from_args(args, parser=None):
    from fastmaisi.pipelines.generate import GenerateRequest

    if args.from_record:
        from fastmaisi.pipelines.record_replay import request_from_record

        return request_from_record(args, parser or build_parser())
    if args.allow_changed_inputs:
        raise ValueError("--allow-changed-inputs goes with --from-record")
    return GenerateRequest(
        output_dir=args.output, variant=args.variant, weights=_absolute(args.weights),
        network_config=_absolute(args.network_config),
        size=tuple(args.size) if args.size else None, spacing=tuple(args.spacing) if args.spacing else None,
        modality=args.modality, body_region=tuple(args.body_region), mask=_mask_arg(args.mask),
        mask_vocabulary=args.mask_vocabulary, mask_db=_absolute(args.mask_db), strict_mask=args.strict_mask,
        organ_sizes=dict(args.organ_size), anatomy_size_db=args.anatomy_size_db,
        workflow_name=args.workflow, steps=args.steps, mask_steps=args.mask_steps,
        guidance_scale=args.guidance_scale, modality_guidance_scale=args.modality_guidance_scale,
        tumour_guidance_scale=args.tumour_guidance_scale, mask_generator=args.mask_generator,
        demographics=_demographics(args.demographic), mask_guidance_scale=args.mask_guidance_scale,
        seed=args.seed, num_samples=args.num_samples,
        max_retries=args.max_retries, device=args.device, memory_budget_gb=args.memory_budget_gb,
        decode_devices=args.decode_devices,
        overwrite=args.overwrite, fmt=args.format, sampler=args.sampler,
        cuda_graphs=args.cuda_graphs, force=args.force)


def _demographics(pairs) -> dict:
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"--demographic {name} given twice")
        seen[name] = value
    return seen


def _mask_arg(mask):
    """--mask's paths, absolute (a record reproduces from any folder): one path, or a list when several merge."""
    if not mask:
        return None
    paths = [_absolute(m) for m in mask]
    return paths[0] if len(paths) == 1 else paths


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
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage mistake (2, already reported in one line)
        return int(exc.code or 0)
    from fastmaisi.cli_guard import CreatedFolders, is_fault, report
    from fastmaisi.pipelines.generate import generate

    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
    created = CreatedFolders(args.output)
    previous = _on_sigterm(_terminated)  # a scheduler's stop (Slurm preemption) ends like Ctrl-C
    try:
        request = request_from_args(args, parser)
        results = generate(request, progress=not args.quiet, dry_run=args.dry_run, manifest=args.manifest,
                           shard=args.shard, on_sample=_print_sample)
    except KeyboardInterrupt as exc:
        code = 143 if isinstance(exc, _Terminated) else EXIT_INTERRUPTED
        print(f"fastmaisi generate: interrupted; complete samples are kept in {args.output}, temporary files were "
              "removed; run the same command again to finish", file=sys.stderr)
        return code
    except Exception as exc:
        if not is_fault(exc):
            raise
        return report("fastmaisi generate", exc, created)
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
