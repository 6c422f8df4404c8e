"""API request fields -> a `GenerateRequest`, with every mistake reported as (field, one-line message).

The fields are those of `GenerateRequest` that a user chooses; the server fixes the rest (weights, variant, device,
output folder). Fields that only some versions of `GenerateRequest` have (demographics, mask vocabulary, ...) are
accepted when the dataclass has them, so the page follows the pipeline without changes here.
"""

from __future__ import annotations

import dataclasses
import math

# field -> kind; "int3"/"float3": three numbers, "names2": two strings, "sizes": {organ: number}
USER_FIELDS = {
    "workflow": "str", "organ_sizes": "sizes", "size": "int3", "spacing": "float3", "modality": "str",
    "seed": "int", "steps": "int", "mask_steps": "int", "guidance_scale": "float", "body_region": "names2",
    "sampler": "str", "max_retries": "int", "strict_mask": "bool",
}
# accepted only when GenerateRequest has the field (other branches of the pipeline add them)
OPTIONAL_FIELDS = {"demographics": "dict", "mask_vocabulary": "str", "mask_generator": "str",
                   "guidance": "dict", "organ_guidance": "dict", "guidance_strength": "float"}
WORKFLOWS = ("image", "from-mask", "paired")
# the start of `resolve`'s messages -> the field they are about
_MESSAGE_FIELDS = (("--size", "size"), ("--spacing", "spacing"), ("--modality", "modality"), ("--steps", "steps"),
                   ("--mask-steps", "mask_steps"), ("--mask", "mask"), ("--sampler", "sampler"),
                   ("organ sizes", "organ_sizes"), ("the paired workflow", "organ_sizes"),
                   ("--organ-size", "organ_sizes"), ("--max-retries", "max_retries"), ("--guidance", "guidance_scale"),
                   ("unknown modality", "modality"), ("--demographics", "demographics"), ("variant", "workflow"))


class RequestError(ValueError):
    """A bad request field: `field` names it (None: the request as a whole)."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field


def request_fields() -> set[str]:
    from fastmaisi.pipelines.generate import GenerateRequest

    return {f.name for f in dataclasses.fields(GenerateRequest)}


def accepted_fields() -> dict[str, str]:
    """The fields this installation's pipeline takes, with their kinds (for the page and for validation)."""
    have = request_fields()
    return {**USER_FIELDS, **{k: v for k, v in OPTIONAL_FIELDS.items() if k in have}}


def _number(name: str, value, integer: bool):
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(name, f"{name}: {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(name, f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise RequestError(name, f"{name}: {value!r} is not a finite number")
    if integer:
        if number != int(number):
            raise RequestError(name, f"{name}: {value!r} is not an integer")
        return int(number)
    return number


def _coerce(name: str, kind: str, value):
    if kind in ("int", "float"):
        return _number(name, value, kind == "int")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise RequestError(name, f"{name}: {value!r} is not true or false")
    if kind == "str":
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise RequestError(name, f"{name}: {value!r} is not a string")
    if kind in ("int3", "float3", "names2"):
        n = 2 if kind == "names2" else 3
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise RequestError(name, f"{name}: expected a list of {n} values, got {value!r}")
        if kind == "names2":
            return tuple(_coerce(name, "str", v) for v in value)
        return tuple(_number(name, v, kind == "int3") for v in value)
    if kind == "sizes":
        if not isinstance(value, dict):
            raise RequestError(name, f"{name}: expected {{organ: size}}, got {value!r}")
        return {str(k).strip().replace("_", " "): _number(f"{name}.{k}", v, False) for k, v in value.items()}
    if kind == "dict":
        if not isinstance(value, dict):
            raise RequestError(name, f"{name}: expected an object, got {value!r}")
        return dict(value)
    raise AssertionError(kind)


def build_request(params: dict, *, output_dir: str, mask: str | None, server: dict):
    """A `GenerateRequest` from the API's JSON fields, the uploaded mask's path and the server's settings
    (variant, weights, device); RequestError names the first bad field. Does not run `resolve` (see `check`)."""
    from fastmaisi.pipelines.generate import GenerateRequest

    if not isinstance(params, dict):
        raise RequestError(None, "the request must be a JSON object of generate fields")
    kinds = accepted_fields()
    unknown = sorted(set(params) - set(kinds))
    if unknown:
        raise RequestError(unknown[0], f"{unknown[0]}: not a request field; the fields are {', '.join(kinds)}")
    values = {k: _coerce(k, kinds[k], v) for k, v in params.items() if v is not None}
    workflow = values.pop("workflow", None)
    if workflow is not None and workflow not in WORKFLOWS:
        raise RequestError("workflow", f"workflow: {workflow!r}; choose from {', '.join(WORKFLOWS)}")
    if workflow == "from-mask" and not mask:
        raise RequestError("mask", "mask: the from-mask workflow needs a label map file")
    if mask and workflow not in (None, "from-mask"):
        raise RequestError("mask", f"mask: a label map is for the from-mask workflow, not {workflow}")
    if values.get("organ_sizes") and workflow not in (None, "paired"):
        raise RequestError("organ_sizes", f"organ_sizes: organ sizes are for the paired workflow, not {workflow}")
    if "seed" in values and not 0 <= values["seed"] < 2**31:
        raise RequestError("seed", f"seed: {values['seed']} must be in 0..2^31-1")
    for name, low, high in (("steps", 1, 10000), ("mask_steps", 1, 1000), ("max_retries", 0, 10)):
        if name in values and not low <= values[name] <= high:
            raise RequestError(name, f"{name}: {values[name]} must be in {low}..{high}")
    return GenerateRequest(output_dir=output_dir, mask=mask, workflow_name=workflow, num_samples=1, fmt="nifti",
                           overwrite=False, **server, **values)


def field_of(message: str) -> str | None:
    """The request field a `resolve`/`generate` message is about (they are written for the CLI's options)."""
    for prefix, name in _MESSAGE_FIELDS:
        if message.startswith(prefix):
            return name
    return None
