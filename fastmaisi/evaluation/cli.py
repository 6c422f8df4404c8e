"""`fastmaisi eval fid | recon | quality`: parse, validate, call one library function, print a table (+ JSON).

Bad input is exit code 2 with one line on stderr; torch is imported only after the arguments are checked.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fastmaisi.argtypes import OneLineParser, as_number
from fastmaisi.argtypes import positive_int as _positive_int


def _ratio(text: str) -> float:
    value = as_number(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def _positive_float(text: str) -> float:
    value = as_number(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


FID_MIN_VOLUMES = 10  # fewer volumes a side: the score is reported with a warning


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastmaisi eval", description="Evaluate generated volumes or a VAE.")
    sub = parser.add_subparsers(dest="what", required=True, metavar="{fid,recon,quality}")

    fid = sub.add_parser("fid", help="2.5D FID between two folders of CT volumes (the MAISI recipe)", description=(
        "2.5D FID (pipeline.md §7): RAS, optional resample/pad/crop, HU clipped to [-1000, 1000]; the central "
        "slices of the XY, YZ and ZX planes through a ResNet-50; FID per plane and their mean. The reference's "
        "published numbers used --spacing 1 1 1 --target-shape 512 512 512 and RadImageNet weights."))
    fid.add_argument("--real", required=True, type=Path, metavar="DIR", help="folder of real NIfTI volumes")
    fid.add_argument("--fake", required=True, type=Path, metavar="DIR",
                     help="folder of generated NIfTI volumes (*_label.nii.gz files are skipped)")
    fid.add_argument("--features", choices=["resnet50"], default="resnet50", help="feature network")
    fid.add_argument("--weights", type=Path, metavar="FILE", help=(
        "local ResNet-50 weights (required; nothing is downloaded): RadImageNet-ResNet50_notop.pth (the "
        "reference's network) or a torchvision resnet50 state dict, .pt/.pth/.safetensors"))
    fid.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1")
    fid.add_argument("--batch-size", type=_positive_int, default=32, help="slices per forward pass (default 32)")
    fid.add_argument("--center-slices-ratio", type=_ratio, default=0.4,
                     help="fraction of central slices kept per plane (default 0.4; 1 = all)")
    fid.add_argument("--spacing", type=_positive_float, nargs=3, metavar=("X", "Y", "Z"),
                     help="resample (trilinear) to this spacing in mm first")
    fid.add_argument("--target-shape", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"),
                     help="then pad with -1000 HU / centre-crop to this shape")
    fid.add_argument("--max-volumes", type=_positive_int, help="use the first N files of each folder (sorted)")
    fid.add_argument("--cache", type=Path, metavar="DIR", help="keep per-volume features here and reuse them")
    fid.add_argument("--frechet-method", choices=["sqrtm", "eigh"], default="sqrtm", help=(
        "sqrtm: scipy.linalg.sqrtm as MONAI/pytorch-fid (default); eigh: the same trace through a symmetric "
        "eigendecomposition, much faster on CPU"))
    _common(fid)

    recon = sub.add_parser("recon", help="VAE encode -> decode: PSNR, SSIM, MAE per volume", description=(
        "Encode and decode each CT volume through the exact tiled VAE; PSNR and 3D SSIM on [0, 1] intensities "
        "(HU clipped to [-1000, 1000]; the same PSNR as HU with data range 2000), MAE in HU."))
    recon.add_argument("--vae", type=Path, metavar="WEIGHTS", help="autoencoder weights (.pt or .safetensors)")
    recon.add_argument("--network-config", type=Path, metavar="JSON",
                       help="official config_network_*.json (its autoencoder_def; default: built-in MAISI VAE)")
    recon.add_argument("--data", required=True, type=Path, metavar="DIR", help="folder of CT NIfTI volumes")
    recon.add_argument("--memory-budget-gb", type=_positive_float, help="GPU memory encode/decode may use")
    recon.add_argument("-d", "--device", default="auto", help="auto, cpu, cuda, cuda:1")
    recon.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                       help="VAE precision (auto: float16 on CUDA, float32 on CPU)")
    _common(recon)

    quality = sub.add_parser("quality", help="per-organ median-HU check over generated image/label pairs",
                             description="Runs the generator's quality check on every <stem>_image.nii.gz + "
                             "<stem>_label.nii.gz (or <stem>_image_dicom/ + <stem>_label_seg.dcm) pair in DIR.")
    quality.add_argument("folder", type=Path, metavar="DIR")
    quality.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON ('-': stdout only)")
    quality.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON ('-': stdout only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def eval_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run = {"fid": _fid, "recon": _recon, "quality": _quality}[args.what]
    try:
        if args.json is not None and str(args.json) != "-" and args.json.exists() and not args.overwrite:
            raise ValueError(f"--json {args.json} already exists; pass --overwrite to replace it")
        report, table = run(args)
        _emit(report, table, args.json)
    except (ValueError, OSError, ImportError, MemoryError) as exc:
        print(f"fastmaisi eval {args.what}: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from fastmaisi.cli_guard import interrupted

        return interrupted(f"fastmaisi eval {args.what}", kept="no report was written")
    return 0


def _fid(args) -> tuple[dict, str]:
    if args.weights is None:
        raise ValueError("--weights FILE is required: a local ResNet-50 state dict (RadImageNet-ResNet50_notop.pth "
                         "or torchvision resnet50); nothing is downloaded")
    if not args.weights.is_file():
        raise FileNotFoundError(f"--weights {args.weights}: no such file")
    from fastmaisi.evaluation.volumes import list_volumes

    real, fake = list_volumes(args.real), list_volumes(args.fake)
    if args.max_volumes:
        real, fake = real[: args.max_volumes], fake[: args.max_volumes]
    if min(len(real), len(fake)) < FID_MIN_VOLUMES:
        print(f"warning: FID from {len(real)} real and {len(fake)} fake volumes says little (slices of one volume "
              f"are not independent samples); use {FID_MIN_VOLUMES} or more volumes a side", file=sys.stderr)
    from fastmaisi.evaluation.fid import FidSettings, fid_2p5d
    from fastmaisi.evaluation.resnet import resnet50_from_file
    from fastmaisi.evaluation.volumes import resolve_device
    from fastmaisi.weights import sha256_file

    device = resolve_device(args.device)
    settings = FidSettings(center_slices_ratio=args.center_slices_ratio,
                           spacing=tuple(args.spacing) if args.spacing else None,
                           target_shape=tuple(args.target_shape) if args.target_shape else None)
    net = resnet50_from_file(args.weights)
    result = fid_2p5d(real, fake, net, settings, device=device, batch_size=args.batch_size, cache_dir=args.cache,
                      net_id=sha256_file(args.weights), method=args.frechet_method, progress=not args.quiet)
    report = {"fid": {k: result[k] for k in ("XY", "YZ", "ZX", "mean")}, "slices": result["slices"],
              "real": {"folder": str(args.real), "volumes": len(real)},
              "fake": {"folder": str(args.fake), "volumes": len(fake)},
              "features": {"network": f"resnet50 ({net.layout} layout)", "dim": net.num_features,
                           "weights": str(args.weights)},
              "settings": {"center_slices_ratio": settings.center_slices_ratio, "spacing": settings.spacing,
                           "target_shape": settings.target_shape, "frechet_method": args.frechet_method}}
    lines = [f"2.5D FID, {report['features']['network']}, {net.num_features}-d features; "
             f"real {len(real)} volumes, fake {len(fake)} volumes", f"{'plane':<6}{'FID':>12}  slices real/fake"]
    for plane in ("XY", "YZ", "ZX"):
        n = result["slices"][plane]
        lines.append(f"{plane:<6}{result[plane]:>12.4f}  {n['real']}/{n['fake']}")
    lines.append(f"{'mean':<6}{result['mean']:>12.4f}")
    return report, "\n".join(lines)


def _recon(args) -> tuple[dict, str]:
    if args.vae is None:
        raise ValueError("--vae WEIGHTS is required: the image autoencoder's weights (.pt or .safetensors)")
    if not args.vae.is_file():
        raise FileNotFoundError(f"--vae {args.vae}: no such file")
    import torch

    from fastmaisi.evaluation.recon import evaluate_reconstruction, load_vae, vae_reconstructor
    from fastmaisi.evaluation.volumes import list_volumes, resolve_device

    paths = list_volumes(args.data)
    device = resolve_device(args.device)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)
    vae = load_vae(args.vae, args.network_config, device=device, dtype=dtype)
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    result = evaluate_reconstruction(paths, vae_reconstructor(vae, memory_budget_bytes=budget), device=device,
                                     progress=not args.quiet)
    report = {**result, "vae": str(args.vae), "dtype": str(dtype).removeprefix("torch."),
              "conventions": "HU clipped to [-1000, 1000] -> [0, 1]; PSNR (data range 1 = 2000 HU) and SSIM "
                             "(3D gaussian 11, sigma 1.5) on [0, 1]; MAE in HU"}
    width = max([len("volume")] + [len(r["file"]) for r in result["volumes"]])
    lines = [f"{'volume':<{width}}  {'PSNR dB':>8}  {'SSIM':>7}  {'MAE HU':>8}"]
    for r in [*result["volumes"], {"file": "mean", **result["mean"]}]:
        lines.append(f"{r['file']:<{width}}  {r['psnr']:>8.3f}  {r['ssim']:>7.4f}  {r['mae_hu']:>8.2f}")
    return report, "\n".join(lines)


def _quality(args) -> tuple[dict, str]:
    from fastmaisi.evaluation.quality import format_report, quality_report

    report = quality_report(args.folder)
    return report, format_report(report)


def _emit(report: dict, table: str, json_out: Path | None) -> None:
    text = json.dumps(_finite(report), indent=2)
    if json_out is not None and str(json_out) == "-":
        print(text)
        return
    print(table)
    if json_out is not None:
        from fastmaisi.io.atomic import _staged, _write_file

        json_out.parent.mkdir(parents=True, exist_ok=True)
        with _staged(str(json_out), overwrite=True) as st:  # complete or absent, never half-written
            _write_file(st.path(json_out), lambda f: f.write((text + "\n").encode()))
        print(f"wrote {json_out}")


def _finite(obj):
    """JSON has no inf/nan: those become null (an exact reconstruction's PSNR is inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
