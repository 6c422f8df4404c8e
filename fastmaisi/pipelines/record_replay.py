"""`fastmaisi generate --from-record FILE`: a record back into a request that reproduces its volume, or a refusal.

The record's request is validated like a new one (unknown keys, wrong types: one line); relative input paths are
read against the record's folder; the mask's and every weight file's SHA-256 must match the record's (else refused,
unless --allow-changed-inputs, which is recorded); the output keeps the original name (STEM); flags that would
change the volume are refused, and those that cannot (where and how it runs and is written) override and are
recorded under "replay".
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

# command-line destinations that may go with --from-record: they change where and how it runs or is written, not
# the volume (-d on another device type changes float rounding; that override is recorded)
OVERRIDES = ("output", "overwrite", "weights", "device", "memory_budget_gb", "format", "cuda_graphs", "quiet",
             "dry_run", "force", "allow_changed_inputs", "from_record")
PATH_FIELDS = ("weights", "network_config", "mask", "mask_db")
_RECORD_SUFFIX = "_record.json"

_STR = (str,)
_NUM = (int, float)


def _is(value: Any, types: tuple) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def _triple(value: Any, types: tuple) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 3 and all(_is(v, types) for v in value)


# field -> (test, what it must be); None is allowed where the dataclass default is None
_TYPES = {
    "output_dir": (lambda v: _is(v, _STR), "a folder name"),
    "variant": (lambda v: _is(v, _STR), "a variant name"),
    "weights": (lambda v: _is(v, _STR), "a folder name"),
    "network_config": (lambda v: _is(v, _STR), "a file name"),
    "size": (lambda v: _triple(v, (int,)), "3 integers"),
    "spacing": (lambda v: _triple(v, _NUM), "3 numbers"),
    "modality": (lambda v: _is(v, (str, int)), "a modality name or code"),
    "body_region": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is(x, _STR) for x in v),
                    "2 region names"),
    "mask": (lambda v: _is(v, _STR), "a file or folder name"),
    "mask_db": (lambda v: _is(v, _STR), "a folder name"),
    "strict_mask": (lambda v: isinstance(v, bool), "true or false"),
    "organ_sizes": (lambda v: isinstance(v, dict) and all(_is(k, _STR) and _is(x, _NUM) for k, x in v.items()),
                    "a {name: fraction} object"),
    "steps": (lambda v: _is(v, (int,)), "an integer"),
    "mask_steps": (lambda v: _is(v, (int,)), "an integer"),
    "guidance_scale": (lambda v: _is(v, _NUM), "a number"),
    "seed": (lambda v: _is(v, (int,)), "an integer"),
    "num_samples": (lambda v: _is(v, (int,)), "an integer"),
    "max_retries": (lambda v: _is(v, (int,)), "an integer"),
    "device": (lambda v: _is(v, _STR), "a device name"),
    "memory_budget_gb": (lambda v: _is(v, _NUM), "a number"),
    "overwrite": (lambda v: isinstance(v, bool), "true or false"),
    "fmt": (lambda v: v in ("nifti", "dicom"), "nifti or dicom"),
    "sampler": (lambda v: _is(v, _STR), "euler or ab2"),
    "cuda_graphs": (lambda v: isinstance(v, bool), "true or false"),
    "workflow_name": (lambda v: v in ("image", "from-mask", "paired"), "image, from-mask or paired"),
    "force": (lambda v: isinstance(v, bool), "true or false"),
    "output_stem": (lambda v: _is(v, _STR), "a file name"),
    "replay": (lambda v: isinstance(v, dict), "an object"),
}


def request_from_dict(saved: dict, where: str):
    """A GenerateRequest from a record's "request" object: unknown keys and wrong types refused (ValueError)."""
    from fastmaisi.pipelines.generate import GenerateRequest

    known = {f.name: f for f in fields(GenerateRequest)}
    unknown = sorted(set(saved) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown request key(s) {', '.join(map(repr, unknown))} (an edited or newer "
                         "record?)")
    for name, value in saved.items():
        test, what = _TYPES.get(name, (lambda v: True, ""))
        nullable = known[name].default is None
        if not ((value is None and nullable) or test(value)):
            raise ValueError(f"{where}: request {name!r} must be {what}, got {value!r}")
    values = {k: tuple(v) if k in ("size", "spacing", "body_region") and isinstance(v, list) else v
              for k, v in saved.items()}
    values.setdefault("output_dir", ".")
    return GenerateRequest(**values)


def conflicting_flags(args, parser) -> list[str]:
    """The flags given with --from-record that would change the recorded request (their values differ from the
    parser's defaults)."""
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.dest in OVERRIDES or action.dest == "help":
            continue
        if getattr(args, action.dest, None) != action.default:
            flags.append(max(action.option_strings, key=len))
    return flags


def original_stem(record: dict, path: Path) -> str:
    """The output name the record's volume was written under: from its image file, else from the record's name."""
    image = ((record.get("outputs") or {}).get("image") or {}).get("file")
    for suffix in ("_image.nii.gz", "_image_dicom"):
        if isinstance(image, str) and image.endswith(suffix) and len(image) > len(suffix):
            return image[: -len(suffix)]
    if path.name.endswith(_RECORD_SUFFIX) and len(path.name) > len(_RECORD_SUFFIX):
        return path.name[: -len(_RECORD_SUFFIX)]
    return f"sample_{record['seed']:06d}"


def _resolve_path(value: str | None, base: Path) -> str | None:
    if value is None or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _changed_inputs(record: dict, request, variant) -> list[str]:
    """Inputs whose SHA-256 differs from the record's (or that are missing): the mask and every weight file."""
    from fastmaisi.pipelines.models import weight_file
    from fastmaisi.weights import sha256_file

    changed = []
    mask = record.get("mask")
    if request.mask and isinstance(mask, dict) and mask.get("sha256"):
        p = Path(request.mask)
        if p.is_file() and sha256_file(p) != mask["sha256"]:
            changed.append(f"mask {p}")
    if request.weights:
        weights_dir = Path(request.weights)
    else:
        from fastmaisi.demo import DEMO_WEIGHTS_DIR

        weights_dir = DEMO_WEIGHTS_DIR
    for role, info in (record.get("weights") or {}).items():
        if not (isinstance(info, dict) and info.get("sha256")) or role not in variant.files:
            continue
        try:
            p = weight_file(weights_dir, variant.files[role])
        except ValueError:
            continue  # missing: generate names it
        if sha256_file(p) != info["sha256"]:
            changed.append(f"{role} weights {p}")
    return changed


def request_from_record(args, parser):
    """The request that reproduces `args.from_record`'s volume with the allowed overrides of `args`; ValueError
    (one line) for a bad record, a conflicting flag or a changed input."""
    from fastmaisi.io import read_record
    from fastmaisi.variants import get_variant
    from fastmaisi.weights import sha256_file

    path = Path(args.from_record)
    if not path.is_file():
        raise ValueError(f"--from-record {path}: no such file")
    conflicts = conflicting_flags(args, parser)
    if conflicts:
        raise ValueError(f"--from-record reproduces the recorded request; {', '.join(conflicts)} would change it: "
                         "leave them out (allowed with it: -o, --overwrite, --weights, -d, --memory-budget-gb, "
                         "--format, --no-cuda-graphs, --force, --allow-changed-inputs)")
    record = read_record(path)
    saved = dict(record["request"])
    saved.pop("replay", None)
    request = request_from_dict(saved, f"--from-record {path}")
    base = path.resolve().parent
    for name in PATH_FIELDS:
        setattr(request, name, _resolve_path(getattr(request, name), base))
    mask = record.get("mask")
    if request.mask_db and isinstance(mask, dict) and isinstance(mask.get("path"), str):
        request.mask, request.mask_db = _resolve_path(mask["path"], base), None  # the candidate this volume used
        request.workflow_name = request.workflow_name or "from-mask"
    overrides = {}
    for dest, field in (("weights", "weights"), ("device", "device"), ("memory_budget_gb", "memory_budget_gb"),
                        ("format", "fmt"), ("cuda_graphs", "cuda_graphs")):
        given = getattr(args, dest)
        if given != parser.get_default(dest) and given != getattr(request, field):
            overrides[field] = given
            setattr(request, field, str(Path(given).resolve()) if field == "weights" else given)
    request.output_dir, request.overwrite, request.force = args.output, args.overwrite, args.force
    request.num_samples, request.seed, request.max_retries = 1, record["seed"], 0
    request.output_stem = original_stem(record, path)
    changed = _changed_inputs(record, request, get_variant(request.variant_name))
    if changed and not args.allow_changed_inputs:
        raise ValueError(f"--from-record {path}: {'; '.join(changed)} differ from the recorded SHA-256, so the "
                         "volume would not be the recorded one; restore them, or pass --allow-changed-inputs")
    request.replay = {"record": str(path.resolve()), "record_sha256": sha256_file(path), "overrides": overrides,
                      "changed_inputs": changed, "allow_changed_inputs": bool(args.allow_changed_inputs)}
    return request
