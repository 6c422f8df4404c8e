"""The v2 mask generator's 19-number condition (NVIDIA's `rflow-mask`): 14 organ / tumour size slots and 5
demographics, with NVIDIA's input rules. Torch-free: the CLI and the web app read the names from here.

Vector layout (NV-Generate-CTMR `scripts/sample_mask.py`): slots 0-8 organ sizes, 9-13 tumour sizes, 14-18 age,
sex, weight, BMI, height normalised to [0, 1]; an unset slot is -1 (the unconditional vector is all -1).
"""

from __future__ import annotations

ORGAN_SLOTS = ("liver", "spleen", "stomach", "pancreas", "colon", "left kidney", "right kidney", "lung",
               "gallbladder")
TUMOUR_SLOTS = ("lung tumor", "pancreatic tumor", "hepatic tumor", "colon cancer primaries", "bone lesion")
SIZE_SLOTS = ORGAN_SLOTS + TUMOUR_SLOTS  # slots 0-13
TUMOUR_SLOT_LABELS = (23, 24, 26, 27, 128)  # MAISI label of each tumour slot, in slot order
DEMOGRAPHICS = ("age", "sex", "weight", "bmi", "height")  # slots 14-18
CONDITION_DIM = len(SIZE_SLOTS) + len(DEMOGRAPHICS)  # 19
UNSET = -1.0
V2_STEPS = 100  # NVIDIA's mask_generation_num_inference_steps for rflow-mask
V2_GUIDANCE_SCALE = 2.0  # NVIDIA's mask_generation_cfg_guidance_scale

DEMOGRAPHIC_MAX = {"age": 120.0, "weight": 200.0, "bmi": 75.0, "height": 200.0}  # value / max -> slot
DEMOGRAPHIC_UNITS = {"age": "years", "weight": "kg", "bmi": "kg/m^2", "height": "cm"}
TRAINING_RANGES = {"age": (19, 87), "weight": (22, 144), "bmi": (18, 63), "height": (160, 190)}
# NVIDIA's docs say sex is "normalised to [0, 1]" without the coding; M = 1, F = 0 is our reading (not verified
# against their training manifest): change here if it turns out otherwise.
SEX_CODES = {"M": 1.0, "F": 0.0}


def parse_demographic(name: str, value) -> float | str:
    """A demographic as given on the command line: sex stays a letter, the others become numbers."""
    name = name.strip().lower()
    if name == "sex":
        return str(value).strip().upper()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--demographic {name}={value!r}: not a number") from None


def check_conditions(organ_sizes: dict, demographics: dict) -> list[str]:
    """NVIDIA's `check_input_ct` rules for the v2 condition: raise ValueError (one line) on a refusal, return the
    warnings (training ranges, height, a size target with 3 or more demographics)."""
    if len(organ_sizes) > 1:
        raise ValueError(f"--organ-size: the v2 mask generator takes at most ONE size target (one organ or one "
                         f"tumour), got {len(organ_sizes)}: {', '.join(organ_sizes)}")
    for name, size in organ_sizes.items():
        if name not in SIZE_SLOTS:
            raise ValueError(f"--organ-size {name!r}: the v2 slots are {', '.join(SIZE_SLOTS)}")
        if size != -1 and not 0.0 <= float(size) <= 1.0:
            raise ValueError(f"--organ-size {name}={size}: must be in [0, 1] or -1")
    warnings = []
    for name, value in demographics.items():
        if name not in DEMOGRAPHICS:
            raise ValueError(f"--demographic {name!r}: choose from {', '.join(DEMOGRAPHICS)}")
        if name == "sex":
            if str(value).upper() not in SEX_CODES:
                raise ValueError(f"--demographic sex={value!r}: must be M or F")
            continue
        top, units = DEMOGRAPHIC_MAX[name], DEMOGRAPHIC_UNITS[name]
        if not 0.0 <= float(value) <= top:
            raise ValueError(f"--demographic {name}={value}: outside [0, {top:g}] {units}")
        lo, hi = TRAINING_RANGES[name]
        if not lo <= float(value) <= hi:
            warnings.append(f"--demographic {name}={value:g} is outside the training range {lo}-{hi} {units}; the "
                            "model may extrapolate")
    if "weight" in demographics and "bmi" in demographics:
        raise ValueError("--demographic: give weight or bmi, not both (they come from disjoint training data)")
    if "height" in demographics:
        warnings.append("--demographic height: present in ~0.4 % of the training data; its effect is unreliable "
                        "(prefer age, sex, weight or bmi)")
    if organ_sizes and len(demographics) >= 3:
        warnings.append(f"a size target with {len(demographics)} demographics is heavily constrained and out of "
                        "distribution: quality is not guaranteed")
    return warnings


def condition_vector(organ_sizes: dict, demographics: dict) -> list[float]:
    """The 19 numbers (checked inputs): sizes in their slots, demographics / their maximum, sex M 1 / F 0, else -1."""
    vector = [UNSET] * CONDITION_DIM
    for name, size in organ_sizes.items():
        vector[SIZE_SLOTS.index(name)] = float(size)
    for name, value in demographics.items():
        slot = len(SIZE_SLOTS) + DEMOGRAPHICS.index(name)
        vector[slot] = SEX_CODES[str(value).upper()] if name == "sex" else float(value) / DEMOGRAPHIC_MAX[name]
    return vector


def target_tumour_label(vector) -> int | None:
    """The MAISI label of the tumour the vector asks for (the last tumour slot that is set), None if none is."""
    start = len(ORGAN_SLOTS)
    wanted = [lab for lab, v in zip(TUMOUR_SLOT_LABELS, list(vector)[start:start + len(TUMOUR_SLOTS)]) if v != UNSET]
    return wanted[-1] if wanted else None


__all__ = ["ORGAN_SLOTS", "TUMOUR_SLOTS", "SIZE_SLOTS", "DEMOGRAPHICS", "CONDITION_DIM", "DEMOGRAPHIC_MAX",
           "TRAINING_RANGES", "SEX_CODES", "parse_demographic", "check_conditions", "condition_vector",
           "target_tumour_label"]
