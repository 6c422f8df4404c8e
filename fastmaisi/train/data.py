"""Training data: NIfTI volumes, latents and label maps -> tensors, the reference's preprocessing, the sample order.

Runtime needs only nibabel, numpy and torch (MONAI is a test-only dependency). Arrays are (X, Y, Z) in RAS+
(`nibabel.as_closest_canonical`, as the reference's `Orientationd("RAS")`); tensors are channel-first (C, X, Y, Z).

Latent files (what `fastmaisi encode` writes and the diffusion/ControlNet trainers read) follow the reference
(`diff_model_create_training_data.py`), so its trainer can read ours and ours can read its files:
    <name>_emb.nii.gz        float32 NIfTI [X/4, Y/4, Z/4, 4], the affine of the resized image
    <name>_emb.nii.gz.json   sidecar: "dim" (resized image size), "spacing" (its mm), "modality" (name or code),
                             optional "top_region_index" / "bottom_region_index" (one-hot 4), optional "label"
                             (a label map on the resized image grid, path relative to the sidecar)

Sample order (`GlobalBatchSampler`): one stream of positions shared by all ranks, so that N processes x batch b see
exactly the samples (and the per-sample random numbers, see `sample_generator`) of 1 process x batch N*b.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("fastmaisi.train")

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LATENT_SUFFIX = "_emb.nii.gz"


# ------------------------------------------------------------------------------------------------ per-sample randomness
def derive_seed(seed: int, *stream: int) -> int:
    """A well-mixed 63-bit seed from (seed, stream ids) (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), *stream]).generate_state(1, np.uint64)[0] >> 1)


def sample_generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """torch Generator on `device` for one sample's random stream (noise, timestep, dropout, ... each its own id)."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream))


def randn_per_sample(seeds: torch.Tensor, shape: Sequence[int], stream: int, device,
                     dtype=torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal noise, sample i drawn from its own seed: independent of batch composition."""
    return torch.stack([torch.randn(tuple(shape), generator=sample_generator(int(s), stream, device), device=device,
                                    dtype=dtype) for s in seeds.tolist()])


def rand_per_sample(seeds: torch.Tensor, stream: int, device) -> torch.Tensor:
    """(B,) uniform [0, 1) numbers, one per sample seed."""
    return torch.stack([torch.rand((), generator=sample_generator(int(s), stream, device), device=device)
                        for s in seeds.tolist()])


# ---------------------------------------------------------------------------------------------------------- sampling
class GlobalBatchSampler:
    """Infinite batches of (dataset index, sample seed) for one rank.

    Epoch e is a permutation of range(n) drawn from (seed, e); the epochs are concatenated into one stream of
    positions p = 0, 1, 2, ...; micro-batch k of the whole job covers positions [k*G, (k+1)*G) with G = batch_size *
    world_size, and rank r takes its `batch_size` consecutive positions. Position p's sample seed is derived from
    (seed, p), so the noise a sample gets does not depend on how a global batch is split across ranks. Resuming at
    micro-batch k needs only k (`start`).
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self._perm: tuple[int, np.ndarray] | None = None

    def position(self, k: int) -> int:
        """Stream position of the first sample of micro-batch k on this rank."""
        return (k * self.world_size + self.rank) * self.batch_size

    def item(self, p: int) -> tuple[int, int]:
        epoch, i = divmod(p, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        return int(self._perm[1][i]), derive_seed(self.seed, p)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while True:
            p = self.position(k)
            yield [self.item(q) for q in range(p, p + self.batch_size)]
            k += 1


def collate(samples: list[dict]) -> dict:
    """Stack tensors (and numbers) key by key; the sample seeds become "seed" (B,) int64."""
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0]}


class SampleDataset(torch.utils.data.Dataset):
    """Items -> training samples: `load(item)` decodes (cached in memory if `cache`), `make(decoded, rng)` builds
    the sample tensors with the sample's own numpy Generator (random patches, flips).

    Indexed by (index, seed) pairs from `GlobalBatchSampler`. An item that fails to load is logged, counted, and
    replaced by the next item (deterministically); when more than `max_bad_fraction` of the items have failed the
    run stops with a ValueError. With DataLoader workers each worker keeps its own cache.
    """

    def __init__(self, items: list[dict], load: Callable[[dict], dict],
                 make: Callable[[dict, np.random.Generator], dict], cache: bool = False,
                 max_bad_fraction: float = 0.1):
        if not items:
            raise ValueError("the dataset is empty: no training items")
        self.items, self.load, self.make = items, load, make
        self.cache: dict[int, dict] | None = {} if cache else None
        self.max_bad_fraction = max_bad_fraction
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def decoded(self, index: int) -> dict:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        out = self.load(self.items[index])
        if self.cache is not None:
            self.cache[index] = out
        return out

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        for k in range(len(self.items)):
            i = (index + k) % len(self.items)
            if i in self.bad:
                continue
            try:
                decoded = self.decoded(i)
            except Exception as e:  # noqa: BLE001 - nibabel/zlib/OS errors of many types: skip, count, maybe fail
                self.bad.add(i)
                log.warning("skipping unreadable item %s: %s: %s", _describe(self.items[i]), type(e).__name__, e)
                check_bad_fraction(len(self.bad), len(self.items), self.max_bad_fraction)
                continue
            sample = self.make(decoded, np.random.default_rng(derive_seed(seed, 0)))
            sample["seed"] = torch.tensor(seed, dtype=torch.int64)
            return sample
        raise ValueError("no readable item left in the dataset")


def check_bad_fraction(bad: int, total: int, max_fraction: float) -> None:
    if total == 0 or bad > max_fraction * total:
        raise ValueError(f"{bad} of {total} volumes are unreadable (more than the allowed fraction "
                         f"{max_fraction:g}; see the warnings above, or raise --max-bad-fraction)")


def _describe(item: dict) -> str:
    return str(item.get("image") or item.get("label") or item)


# --------------------------------------------------------------------------------------------------------- reading
def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_image(path: str | os.PathLike, channel: int = 0) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """A NIfTI volume, RAS, float32 (X, Y, Z); 4-D files keep `channel` (the reference's select_channel).

    Returns (array, spacing (mm), affine). Raises ValueError for an unreadable file or one that is not 3-D/4-D.
    """
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ValueError(f"cannot read {path} as NIfTI: {type(e).__name__}: {e}") from e
    if data.ndim == 4:
        data = data[..., channel]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    spacing = tuple(float(s) for s in np.linalg.norm(img.affine[:3, :3], axis=0))
    return np.ascontiguousarray(data), spacing, img.affine


def read_label(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """A label map, RAS, (X, Y, Z) integer ids, spacing, affine (`fastmaisi.io.read_label_map`)."""
    from fastmaisi.io import read_label_map

    return read_label_map(path)


def header_shape(path: str | os.PathLike) -> tuple[int, ...]:
    """Spatial shape (X, Y, Z) of a NIfTI file from its header only, in RAS order."""
    import nibabel as nib

    img = nib.load(str(path))
    ornt = nib.orientations.io_orientation(img.affine)
    shape = img.shape[:3]
    return tuple(int(shape[int(ax)]) for ax in np.argsort(ornt[:, 0]))


def read_latent(path: str | os.PathLike) -> torch.Tensor:
    """A latent NIfTI [x, y, z, C] (RAS) -> float32 tensor (C, x, y, z)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim != 4:
        raise ValueError(f"{path}: a latent file holds [x, y, z, channels], got shape {data.shape}")
    # reorient the three spatial axes to RAS, keeping the channel axis last
    ornt = nib.orientations.io_orientation(img.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(data, -1, 0)))


def write_latent(path: str | os.PathLike, z: torch.Tensor, affine: np.ndarray) -> None:
    """Write a latent (C, x, y, z) as float32 NIfTI [x, y, z, C] atomically (temporary name, then rename)."""
    import nibabel as nib

    path = Path(path)
    data = np.moveaxis(z.detach().float().cpu().numpy(), 0, -1)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_data_dtype(np.float32)
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz" if path.name.endswith(".gz") else ".nii")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj) + "\n"), suffix=".json")


def atomic_write(path: Path, write: Callable[[str], None], suffix: str = "") -> None:
    """Call write(tmp) on a temporary file in path's folder, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------- preprocessing (reference rules)
def encoded_shape(shape: Sequence[int], multiple: int = 128) -> tuple[int, ...]:
    """Each axis rounded to the nearest multiple of `multiple`, at least `multiple` (the reference's
    diff_model_create_training_data.py)."""
    return tuple(max(multiple, int(round(n / multiple)) * multiple) for n in shape)


def is_ct(modality: str | int) -> bool:
    """CT (HU) or MR intensities: codes 1..7 / names starting "ct" are CT; 8.. / "mr..." are MR."""
    from fastmaisi.io import is_ct as _is_ct

    return _is_ct(modality)


def scale_intensity(x: np.ndarray, modality: str | int) -> np.ndarray:
    """The reference's fixed intensity rules -> about [0, 1] (float32).

    CT: HU [-1000, 1000] -> [0, 1], clipped. MR: percentiles [0, 99.5] -> [0, 1], not clipped.
    """
    x = x.astype(np.float32, copy=False)
    if is_ct(modality):
        return np.clip((x + 1000.0) / 2000.0, 0.0, 1.0)
    lo, hi = np.percentile(x, [0.0, 99.5])
    return (x - lo) / max(float(hi - lo), 1e-8)


def resize(x: torch.Tensor, shape: Sequence[int], mode: str = "trilinear") -> torch.Tensor:
    """(C, X, Y, Z) -> (C, *shape): trilinear (align_corners=False, MONAI Resized) or nearest (labels)."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    kwargs = {"align_corners": False} if mode == "trilinear" else {}
    dtype = x.dtype
    return F.interpolate(x[None].float(), size=tuple(shape), mode=mode, **kwargs)[0].to(dtype)


def resized_affine(affine: np.ndarray, old_shape: Sequence[int], new_shape: Sequence[int]) -> np.ndarray:
    """Affine of a volume resized over the same field of view: each column scaled by old/new size."""
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] * (np.asarray(old_shape, dtype=np.float64) / np.asarray(new_shape))[None, :]
    return out


def random_patch(arrays: Sequence[torch.Tensor], patch: Sequence[int], rng: np.random.Generator) -> list[torch.Tensor]:
    """Zero-pad each (C, X, Y, Z) tensor symmetrically up to `patch` (SpatialPad), then one random crop for all."""
    shape = arrays[0].shape[1:]
    pads = [max(0, p - n) for p, n in zip(patch, shape)]
    if any(pads):
        pad = [v for d in reversed(pads) for v in (d // 2, d - d // 2)]
        arrays = [F.pad(a, pad) for a in arrays]
        shape = arrays[0].shape[1:]
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(shape, patch)]
    sl = (slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, patch))
    return [a[sl] for a in arrays]


def random_flip(arrays: Sequence[torch.Tensor], rng: np.random.Generator, p: float = 0.5) -> list[torch.Tensor]:
    """Flip every spatial axis with probability p (the same flips for all arrays)."""
    axes = [d + 1 for d in range(arrays[0].ndim - 1) if rng.random() < p]
    return [a.flip(axes) if axes else a for a in arrays]


# ------------------------------------------------------------------------------------------------------ data lists
def read_datalist(source: Path, base_dir: Path | None, section: str = "training") -> list[dict]:
    """Entries of a MAISI-style datalist JSON ({"training": [{"image": ..., ...}]}), paths made absolute against
    `base_dir` (default: the JSON's folder)."""
    try:
        data = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the datalist {source}: {e}") from e
    entries = data.get(section) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected {{'{section}': [ {{'image': ...}}, ... ]}} or a list of entries")
    base = base_dir or source.parent
    out = []
    for e in entries:
        e = {"image": e} if isinstance(e, str) else dict(e)
        for key in ("image", "label"):
            if isinstance(e.get(key), str):
                e[key] = base / e[key]
        out.append(e)
    return out


def list_volumes(source: str | os.PathLike, key: str = "image",
                 base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Items [{key: path, ...}] from a folder (every NIfTI file below it, sorted) or a datalist JSON."""
    source = Path(source)
    if source.is_dir():
        return [{key: p} for p in sorted(source.rglob("*")) if p.is_file() and is_nifti(p)]
    if source.is_file() and source.suffix == ".json":
        entries = read_datalist(source, Path(base_dir) if base_dir else None)
        if key == "label":  # label-only lists may name the map "label" or "image"
            entries = [{**e, "label": e.get("label", e.get("image"))} for e in entries]
        return entries
    raise ValueError(f"training data {source}: expected a folder of NIfTI files or a datalist .json")


def list_latents(source: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> list[dict]:
    """Latent items with their sidecar metadata merged in (datalist entry keys win over the sidecar's).

    A datalist entry naming an image rather than a latent maps to `<image stem>_emb.nii.gz` under `base_dir`, as the
    reference trainer does.
    """
    source = Path(source)
    if source.is_dir():
        entries = [{"image": p} for p in sorted(source.rglob("*" + LATENT_SUFFIX))]
    else:
        entries = list_volumes(source, "image", base_dir)
        for e in entries:
            p = Path(e["image"])
            if not p.name.endswith(LATENT_SUFFIX):
                e["image"] = p.with_name(nifti_stem(p) + LATENT_SUFFIX)
    items = []
    for e in entries:
        sidecar = Path(str(e["image"]) + ".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        if isinstance(meta.get("label"), str) and "label" not in e:
            meta["label"] = sidecar.parent / meta["label"]
        items.append({**meta, **e})
    return items


def check_items(items: list[dict], keys: Sequence[str], max_bad_fraction: float, what: str,
                check: Callable[[dict], None] | None = None) -> list[dict]:
    """Keep the items whose `keys` files exist and whose NIfTI headers read; log and count the others.

    Raises ValueError when nothing is left (naming `what`) or more than `max_bad_fraction` are bad. `check(item)`
    may raise ValueError for a problem that must stop the run (e.g. a label map of the wrong shape).
    """
    if not items:
        raise ValueError(f"no training data: {what} holds no volumes")
    good = []
    for item in items:
        try:
            for key in keys:
                if item.get(key) is None:
                    raise FileNotFoundError(f"the entry has no {key!r}")
                header_shape(item[key])
        except Exception as e:  # noqa: BLE001 - missing, truncated or not-NIfTI: skip and count
            log.warning("skipping %s: %s: %s", _describe(item), type(e).__name__, e)
            continue
        if check is not None:
            check(item)
        good.append(item)
    bad = len(items) - len(good)
    if not good:
        raise ValueError(f"no readable training volume in {what} ({bad} unreadable)")
    check_bad_fraction(bad, len(items), max_bad_fraction)
    if bad:
        log.warning("%d of %d volumes skipped as unreadable", bad, len(items))
    return good


def check_label_grid(item: dict, factor: int = 4) -> None:
    """The label map must lie on the encoded image grid: `factor` x the latent's shape (ValueError naming both)."""
    latent = header_shape(item["image"])
    label = header_shape(item["label"])
    if tuple(label) != tuple(factor * n for n in latent):
        raise ValueError(f"label map {item['label']} has shape {tuple(label)}, but latent {item['image']} of shape "
                         f"{tuple(latent)} needs a label of shape {tuple(factor * n for n in latent)} (the encoded "
                         "image grid); encode the image and its label together with `fastmaisi encode --labels`")


# ---------------------------------------------------------------------------------------------- anatomy-size vector
def organ_size_vector(label: np.ndarray) -> list[float]:
    """The mask DM's 10-slot context from a label map: per slot organ, its voxel count / body voxel count
    (body = every voxel with a label > 0), or -1 when the organ is absent. Slot order: labels.ANATOMY_SIZE_SLOTS.

    NVIDIA's size database does not document its normalisation; this rule is ours and is what our mask DM learns.
    """
    from fastmaisi.labels import ABSENT, ANATOMY_SIZE_SLOTS, label_id

    counts = np.bincount(np.asarray(label).ravel().astype(np.int64), minlength=256)
    body = max(int(counts[1:].sum()), 1)
    out = []
    for name in ANATOMY_SIZE_SLOTS:
        n = int(counts[label_id(name)]) if label_id(name) < len(counts) else 0
        out.append(n / body if n else ABSENT)
    return out
