"""Official MAISI config JSON: turn a `*_def` network entry into the plain dict `fastmaisi.nets.build` takes.

NVIDIA's `config_network_*.json` files are MONAI bundle configs. Their network entries hold `"@name"` references
to top-level values (`"spatial_dims": "@spatial_dims"`); we resolve those. MONAI's `"$..."` Python expressions and
`"%..."` macros (references into other files) are refused with a clear error: a network definition is data, and
evaluating strings from a config file would run code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any


def resolve_network_definition(config: dict, key: str) -> dict:
    """The `key` entry (e.g. "diffusion_unet_def") of an official network config, every `"@name"` replaced."""
    entry = config.get(key)
    if not isinstance(entry, dict) or "_target_" not in entry:
        known = sorted(k for k, v in config.items() if isinstance(v, dict) and "_target_" in v and k.endswith("_def"))
        raise ValueError(f"unknown network {key!r}; this config defines: {', '.join(known) or 'no *_def entries'}")
    return _resolve(entry, config, key, ())


def read_network_definition(path: str | os.PathLike, key: str) -> dict:
    """`resolve_network_definition` on a config JSON file; errors name the file."""
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a network config (expected a JSON object at the top level)")
    try:
        return resolve_network_definition(config, key)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def _resolve(value: Any, config: dict, where: str, refs: tuple[str, ...]) -> Any:
    """Copy of `value` with `"@a"` / `"@a::b"` / `"@a#0"` references replaced by the config entries they name."""
    if isinstance(value, dict):
        return {k: _resolve(v, config, f"{where}.{k}", refs) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, config, f"{where}[{i}]", refs) for i, v in enumerate(value)]
    if not isinstance(value, str) or value[:1] not in ("@", "$", "%"):
        return value
    if value[0] != "@":
        kind = "a Python expression" if value[0] == "$" else "a macro referring to another file"
        raise ValueError(f"{where} = {value!r} is {kind}; only '@name' references are supported, write the value out")
    ref = value[1:]
    if ref in refs:
        raise ValueError(f"circular reference at {where}: {' -> '.join((*refs, ref))}")
    target: Any = config
    for part in re.split(r"::|#", ref):
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise ValueError(f"{where} = {value!r} refers to a config entry that does not exist")
    return _resolve(target, config, ref, (*refs, ref))
