"""Checkpoint files: NVIDIA's published MAISI `.pt` layouts and safetensors, read safely and loaded strictly.

Layouts `load_state_dict_file` recognises (pipeline.md §3); `meta["layout"]` names the one found:

    raw                    {param: tensor}            autoencoder_v1/v2.pt, mask_generation_autoencoder.pt
    unet_state_dict        {"unet_state_dict": sd, "scale_factor": tensor, "epoch", "loss", "num_train_timesteps"}
                           diff_unet_3d_*.pt, mask_generation_diffusion_unet.pt (some autoencoder files use it too)
    controlnet_state_dict  {"controlnet_state_dict": sd, "epoch", "loss"}                      controlnet_3d_*.pt
    state_dict, model_state_dict, model                generic trainer wrappers (fastmaisi's own checkpoints: "model")
    safetensors            a raw state dict, plus an optional sidecar `<file>.json` (what `convert` writes)

Other top-level entries (epoch, loss, optimizer state: most of the 2.17 GB of `diff_unet_3d_rflow-ct.pt`) are ignored
and never read into memory: a zip checkpoint is memory-mapped and only the state dict's tensors are kept. `scale_factor`, when present, is returned as a
float in `meta`. Keys saved from a wrapped model (`module.` from DistributedDataParallel, `_orig_mod.` from
torch.compile) have that prefix removed when every key carries it.

Safety: `.pt`/`.pth` files are read with `torch.load(weights_only=True)` only. A file that needs anything beyond
tensors and plain containers (a pickle that could run code) is refused with `CheckpointError`; it is never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastmaisi.config import read_network_definition
from fastmaisi.argtypes import OneLineParser

FORMAT = "fastmaisi-weights/1"
# Checked in this order; the first key holding a dict is the state dict.
_WRAPPER_KEYS = ("unet_state_dict", "controlnet_state_dict", "state_dict", "model_state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 10  # keys listed per kind in a mismatch message
MMAP = True  # memory-map zip checkpoints (False only to measure what reading them whole costs)


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint, or a checkpoint that does not match its network."""


def load_state_dict_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file into `(state_dict, meta)` on CPU; `meta` has "layout" and, if stored, "scale_factor".

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: empty, truncated or corrupt file, not a checkpoint, or a pickle that is not plain tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint")
    if path.suffix == ".safetensors":
        state_dict, meta = _read_safetensors(path)
    else:
        state_dict, meta = _unwrap(_torch_load(path), path)
    return _plain_state_dict(state_dict, path, meta["layout"]), meta


def load_into(
    net: torch.nn.Module, source: str | os.PathLike | dict[str, torch.Tensor], *, name: str | None = None
) -> dict[str, Any]:
    """Load a checkpoint file (or state dict) into `net` strictly and return its meta.

    Args:
        name: a label for messages, e.g. the network's role: "diff_unet.pt (diffusion_unet) does not match ...".
            For a state dict it replaces the default "state dict".

    Raises:
        CheckpointError: the keys or shapes differ; the message lists missing keys, unexpected keys and shape
            mismatches (the first few of each, with counts). `net` is left unchanged.
    """
    if isinstance(source, dict):
        state_dict, meta, name = source, {"layout": "raw"}, name or "state dict"
    else:
        state_dict, meta = load_state_dict_file(source)
        name = Path(source).name + (f" ({name})" if name else "")
    problems = _mismatches(net.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{name} does not match {type(net).__name__}: {problems}")
    net.load_state_dict(state_dict, strict=True)
    return meta


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(
    checkpoint: str | os.PathLike, out_path: str | os.PathLike, network_definition: dict | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `checkpoint` as safetensors at `out_path` plus a JSON record at `<out_path>.json`; return the record.

    With `network_definition` (a resolved official `*_def` entry) the network is built and the checkpoint must load
    into it strictly before anything is written. Both files are written to temporary names in the output folder
    and then renamed, so an interrupted conversion leaves no file under the final names. Existing outputs are a
    ValueError unless `overwrite`.
    """
    checkpoint, out_path = Path(checkpoint), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"the output file must end in .safetensors, got {out_path}")
    existing = [p for p in (out_path, out_path.with_name(out_path.name + ".json")) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(map(str, existing))} already exist(s); pass --overwrite to replace")
    if out_path.exists() and checkpoint.exists() and out_path.resolve() == checkpoint.resolve():
        raise ValueError(f"the output {out_path} is the checkpoint itself; choose another name")
    state_dict, meta = load_state_dict_file(checkpoint)
    definition = network_definition if network_definition is not None else meta.get("network_definition")
    if network_definition is not None:
        from fastmaisi.nets import build  # lazy: converting without a check needs no network code

        load_into(build(network_definition), state_dict, name=checkpoint.name)

    record: dict[str, Any] = {
        "format": FORMAT,
        "source": checkpoint.name,
        "source_sha256": sha256_file(checkpoint),
        "layout": meta["layout"],
    }
    if "scale_factor" in meta:
        record["scale_factor"] = meta["scale_factor"]
    if definition is not None:
        record["network_definition"] = definition
    _write_pair(out_path, _unshared(state_dict), record)
    return record


def convert_main(argv: list[str] | None = None) -> int:
    """`fastmaisi convert CHECKPOINT -o OUT.safetensors [--network-config JSON --network KEY]`."""
    parser = OneLineParser(
        prog="fastmaisi convert",
        description="Convert a MAISI checkpoint (.pt/.pth/.safetensors) to safetensors plus a JSON record "
        "(OUT.safetensors.json: source file, its sha256, layout, scale_factor). With --network the checkpoint "
        "must first load strictly into that network.",
    )
    parser.add_argument("checkpoint", type=Path, help="e.g. models/diff_unet_3d_rflow-ct.pt")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.safetensors")
    parser.add_argument("--network-config", type=Path, metavar="JSON", help="an official config_network_*.json")
    parser.add_argument("--network", metavar="KEY", help="its *_def entry to check against, e.g. diffusion_unet_def")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.safetensors (and its .json) if present")
    args = parser.parse_args(argv)
    if (args.network is None) != (args.network_config is None):
        parser.error("--network and --network-config must be given together")
    try:
        definition = None if args.network is None else read_network_definition(args.network_config, args.network)
        record = convert(args.checkpoint, args.output, definition, overwrite=args.overwrite)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError
        print(f"fastmaisi convert: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from fastmaisi.cli_guard import interrupted

        return interrupted("fastmaisi convert", kept="nothing was written")
    scale = f", scale_factor {record['scale_factor']}" if "scale_factor" in record else ""
    checked = f", checked against {args.network}" if args.network else ""
    print(f"wrote {args.output} and {args.output}.json (layout {record['layout']}{scale}{checked})")
    return 0


def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)` with every failure turned into a CheckpointError naming the file. Zip
    checkpoints (torch >= 1.6) are memory-mapped (`mmap=True`): tensors the caller drops are never read from disk."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # zip (torch >= 1.6) or pickle protocol >= 2 (legacy)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint or a .safetensors file (it starts with {head!r})")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=MMAP and head == b"PK\x03\x04")
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)|Unsupported (operand|class)", str(e))
        if refused:
            what = f"it references the Python object {refused[1]}" if refused[1] else "it holds pickled Python objects"
            raise CheckpointError(
                f"refused to load {path}: it is not a plain-tensor checkpoint ({what}); "
                "only tensors and plain containers are read, because unpickling anything else can run code"
            ) from e
        raise CheckpointError(f"{path} is truncated or corrupt: {_first_line(e)}") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise CheckpointError(f"{path} is truncated or corrupt: {type(e).__name__}: {_first_line(e)}") from e


def _unwrap(obj: Any, path: Path) -> tuple[dict, dict[str, Any]]:
    """The state dict inside a loaded `.pt` object, and meta (layout, scale_factor)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    layout = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), "raw")
    if layout == "raw":
        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"{path} holds no state dict: expected a dict of tensors or one of the keys "
                f"{', '.join(_WRAPPER_KEYS)}; found keys {_preview(list(obj))}"
            )
        return obj, {"layout": "raw"}
    meta: dict[str, Any] = {"layout": layout}
    if "scale_factor" in obj:
        meta["scale_factor"] = _scalar(obj["scale_factor"], f"{path}: scale_factor")
    state_dict = obj[layout]
    obj.clear()  # the optimizer state, epoch, loss...: dropped here (memory-mapped, so never read)
    return state_dict, meta


def _read_safetensors(path: Path) -> tuple[dict, dict[str, Any]]:
    """Tensors of a safetensors file and meta from its optional sidecar `<file>.json`."""
    try:
        state_dict = load_file(path, device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from e
    meta: dict[str, Any] = {"layout": "safetensors"}
    sidecar = path.with_name(path.name + ".json")
    if sidecar.is_file():
        try:
            record = json.loads(sidecar.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{sidecar} is not valid JSON: {e}") from e
        if not isinstance(record, dict) or record.get("format", FORMAT) != FORMAT:
            raise CheckpointError(f"{sidecar} is not a {FORMAT} record")
        if "scale_factor" in record:
            meta["scale_factor"] = _scalar(record["scale_factor"], f"{sidecar}: scale_factor")
        if "network_definition" in record:
            meta["network_definition"] = record["network_definition"]
    return state_dict, meta


def _plain_state_dict(state_dict: dict, path: Path, layout: str) -> dict[str, torch.Tensor]:
    """Check that `state_dict` is a non-empty {str: tensor} and strip a `module.`/`_orig_mod.` prefix."""
    for k, v in state_dict.items():
        if not (isinstance(k, str) and isinstance(v, torch.Tensor)):
            raise CheckpointError(f"{path} ({layout}): entry {k!r} is a {type(v).__name__}, not a tensor")
    if not state_dict:
        raise CheckpointError(f"{path} ({layout}) holds an empty state dict")
    while prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state_dict)), None):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _mismatches(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """'' when keys and shapes agree, else e.g. '3 missing keys (a, b, c); 1 unexpected key (d)'."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs network {tuple(v.shape)}"
        for k, v in expected.items()
        if k in got and got[k].shape != v.shape
    ]
    parts = [
        f"{len(items)} {noun if len(items) == 1 else plural} ({_preview(items)})"
        for items, noun, plural in (
            (missing, "missing key", "missing keys"),
            (unexpected, "unexpected key", "unexpected keys"),
            (shapes, "shape mismatch", "shape mismatches"),
        )
        if items
    ]
    return "; ".join(parts)


def _preview(items: list) -> str:
    more = f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(map(str, items[:_SHOWN])) + more


def _scalar(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise CheckpointError(f"{what} must be a number or a one-element tensor, got {type(value).__name__}")


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), repr(e))


def _unshared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no two sharing storage (safetensors refuses tied weights); copies only the ties."""
    out, seen = {}, set()
    for k, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _write_pair(out_path: Path, tensors: dict[str, torch.Tensor], record: dict) -> None:
    """Write `out_path` and `<out_path>.json` via temporary files in the same folder and os.replace."""
    sidecar = out_path.with_name(out_path.name + ".json")
    temps = [out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp") for _ in range(2)]
    try:
        temps[1].write_text(json.dumps(record, indent=2) + "\n")
        save_file(tensors, temps[0], metadata={"format": FORMAT})
        # safetensors creates its files private (0600); give it the mode of the ordinary file beside it.
        os.chmod(temps[0], temps[1].stat().st_mode & 0o777)
        os.replace(temps[1], sidecar)
        os.replace(temps[0], out_path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
