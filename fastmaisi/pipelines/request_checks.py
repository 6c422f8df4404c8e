"""Checks of a generate request's values that argparse makes on the command line, for every request (from Python
and from a JSON record too). Each raises ValueError with one line."""

from __future__ import annotations

import math

from fastmaisi.argtypes import SEED_MAX


def check_request(request) -> None:
    """Value rules argparse applies on the command line, for every request: finite guidance, seed range, a
    positive budget, known body regions, and inputs that match the chosen workflow (a record names only inputs
    that were used)."""
    from fastmaisi.argtypes import device as _device_name
    from fastmaisi.labels import BODY_REGIONS

    for flag, g in (("--guidance-scale", request.guidance_scale),
                    ("--modality-guidance-scale", request.modality_guidance_scale),
                    ("--tumour-guidance-scale", request.tumour_guidance_scale),
                    ("--mask-guidance-scale", request.mask_guidance_scale)):
        if g is not None and not (math.isfinite(g) and g >= 0):
            raise ValueError(f"{flag} {g}: must be a finite number >= 0")
    if not 0 <= request.seed <= SEED_MAX:
        raise ValueError(f"--seed {request.seed}: must be in 0..{SEED_MAX}")
    b = request.memory_budget_gb
    if b is not None and not (math.isfinite(b) and b > 0):
        raise ValueError(f"--memory-budget-gb {b}: must be a finite number of GiB > 0")
    try:
        _device_name(request.device)
    except Exception as exc:  # argparse.ArgumentTypeError
        raise ValueError(f"--device {exc}") from None
    bad = [r for r in request.body_region if r not in BODY_REGIONS]
    if bad:
        raise ValueError(f"--body-region {' '.join(request.body_region)}: {', '.join(bad)} is not one of "
                         f"{', '.join(BODY_REGIONS)}")
    top, bottom = (BODY_REGIONS.index(r) for r in request.body_region)
    if top > bottom:
        raise ValueError(f"--body-region {' '.join(request.body_region)}: TOP must be above BOTTOM (order: "
                         f"{', '.join(BODY_REGIONS)})")
    for name, value in (request.organ_sizes or {}).items():
        if not (math.isfinite(value) and (0 <= value <= 1 or value == -1)):
            raise ValueError(f"--organ-size {name}={value}: must be in [0, 1] or -1")
    wf = request.workflow_name
    given = [flag for flag, v in (("--mask", request.mask), ("--mask-db", request.mask_db),
                                  ("--organ-size", request.organ_sizes)) if v]
    if wf == "image" and given:
        raise ValueError(f"--workflow image uses no {', '.join(given)}: leave it out, or choose the workflow it needs")
    if wf == "paired" and (request.mask or request.mask_db):
        raise ValueError("--workflow paired generates its own mask: leave out --mask/--mask-db, or use "
                         "--workflow from-mask")
    if wf == "from-mask" and not (request.mask or request.mask_db):
        raise ValueError("--workflow from-mask needs --mask FILE or --mask-db DIR")
