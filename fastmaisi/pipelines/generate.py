"""`generate`: one request -> the three workflows -> checked, written volumes. Validates everything before compute."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path


from fastmaisi.variants import Variant, fov_warnings, get_variant

RETRY_SEED_STRIDE = 100_003  # retry k of sample i uses seed + i + k * stride: never collides with another sample's seed


@dataclass
class GenerateRequest:
    """Everything a run depends on; stored in every output's JSON record, so a record reproduces its volume."""

    output_dir: str
    variant: str | None = None  # None: rflow-ct with --weights, the built-in demo without
    weights: str | None = None
    network_config: str | None = None
    size: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    modality: str | int | None = None
    body_region: tuple[str, str] = ("chest", "abdomen")
    mask: str | list[str] | None = None  # a label map, per-class folder, DICOM SEG or folder; several are merged
    mask_vocabulary: str = "auto"  # vocabulary of --mask: auto, maisi, total, total_mr, vista3d, ... (labels list)
    mask_db: str | None = None  # folder of candidate label maps (the reference's mask database path)
    strict_mask: bool = False
    organ_sizes: dict = field(default_factory=dict)
    anatomy_size_db: str | None = None  # NVIDIA's all_anatomy_size_conditions.json (default: looked up by --weights)
    steps: int | None = None
    mask_steps: int | None = None  # None: the variant's (1000; the demo's 100)
    guidance_scale: float | None = None
    modality_guidance_scale: float | None = None  # image-only workflow's CFG (NVIDIA cfg_guidance_scale_modality)
    tumour_guidance_scale: float | None = None  # mask workflows' CFG (NVIDIA cfg_guidance_scale_tumor)
    mask_generator: str | None = None  # "v1" or "v2"; None: v2 when its weights are in the weights folder
    demographics: dict = field(default_factory=dict)  # v2 mask generator: age, sex, weight, bmi, height
    mask_guidance_scale: float | None = None  # v2 mask generator's CFG (default 2.0)
    seed: int = 0
    num_samples: int = 1
    max_retries: int = 2
    device: str = "auto"
    memory_budget_gb: float | None = None
    decode_devices: tuple[str, ...] | None = None  # split the decode along D over these devices (budget per device)
    overwrite: bool = False
    fmt: str = "nifti"
    sampler: str = "euler"  # "euler" (the reference's) or "ab2" (rectified flow only; faster, not bit-compatible)
    cuda_graphs: bool = True  # CUDA: replay denoiser steps from a CUDA graph (small latents: sampling.GRAPH_MAX_VOXELS)
    force: bool = False  # start even when the memory or disk estimate says the run does not fit (preflight.py)
    output_stem: str | None = None  # one sample written under this name (--from-record: the original's)
    replay: dict | None = None  # --from-record: the record, its overrides and changed inputs (record_replay.py)

    workflow_name: str | None = None  # "image", "from-mask" or "paired"; None: from-mask with --mask, paired with
    # --organ-size (or with the demo), else image

    @property
    def variant_name(self) -> str:
        return self.variant or ("rflow-ct" if self.weights else "demo")

    @property
    def workflow(self) -> str:
        if self.workflow_name:
            return self.workflow_name
        if self.mask or self.mask_db:
            return "from-mask"
        if self.organ_sizes or self.demographics or get_variant(self.variant_name).default_organ_sizes:
            return "paired"
        return "image"


def resolve(request: GenerateRequest) -> tuple[Variant, dict]:
    """Fill variant defaults and check every input; raise ValueError (one clear line) before any compute."""
    from fastmaisi.labels import modality_code
    from fastmaisi.pipelines.request_checks import check_request

    check_request(request)
    variant = get_variant(request.variant_name)
    size = tuple(request.size or variant.size)
    spacing = tuple(request.spacing or variant.spacing)
    if len(size) != 3 or any(int(s) != s or s <= 0 or s % 32 for s in size):
        raise ValueError(f"--size {' '.join(map(str, size))}: each size must be a positive multiple of 32 "
                         "(the latent is 4x smaller and the UNet halves it three times)")
    if len(spacing) != 3 or any(not 0.1 <= s <= 10.0 for s in spacing):
        raise ValueError(f"--spacing {' '.join(map(str, spacing))}: each spacing must be in 0.1..10 mm")
    code = modality_code(request.modality if request.modality is not None else variant.modality_code)
    is_ct = code <= 7
    if is_ct != (variant.modality == "ct"):
        raise ValueError(f"--modality {request.modality!r} does not match variant {variant.name} "
                         f"({'CT' if variant.modality == 'ct' else 'MR'})")
    if (request.mask or request.mask_db or request.organ_sizes or request.demographics) and not variant.has_controlnet:
        raise ValueError(f"variant {variant.name} has no ControlNet: --mask, --mask-db and --organ-size need a CT "
                         "variant")
    if sum(map(bool, (request.mask, request.mask_db, request.organ_sizes or request.demographics))) > 1:
        raise ValueError("--mask, --mask-db and --organ-size / --demographic are different workflows: give one of "
                         "them")
    if request.sampler not in ("euler", "ab2"):
        raise ValueError(f"--sampler {request.sampler!r}: choose euler or ab2")
    if request.sampler == "ab2" and not variant.scheduler["_target_"].endswith("RFlowScheduler"):
        raise ValueError(f"--sampler ab2 is for rectified-flow variants; {variant.name} uses DDPM")
    variant, mask_opts = _mask_generator(request, variant)
    if mask_opts["mask_generator"] == "v2":
        anatomy, anatomy_db = None, None
    else:
        organ_sizes = request.organ_sizes or (variant.default_organ_sizes if request.workflow == "paired" else None)
        if request.workflow == "paired" and not organ_sizes:
            raise ValueError(f"the paired workflow needs organ sizes: --organ-size NAME=FRACTION (variant "
                             f"{variant.name} has no defaults)")
        anatomy, anatomy_db = _anatomy_sizes(request, organ_sizes) if organ_sizes else (None, None)
    steps = request.steps or variant.steps
    if steps < 1 or (variant.scheduler["_target_"].endswith("DDPMScheduler") and 1000 % steps):
        raise ValueError(f"--steps {steps}: must be >= 1 (and divide 1000 for DDPM)")
    if request.num_samples < 1 or request.max_retries < 0:
        raise ValueError("--num-samples must be >= 1 and --max-retries >= 0")
    guidance = _guidance_scale(request, variant)
    for w in fov_warnings(variant, size, spacing):
        warnings.warn(w, stacklevel=2)
    mask_steps = request.mask_steps or mask_opts.pop("default_mask_steps", None) or variant.mask_steps
    if mask_opts["mask_generator"] == "v1" and (mask_steps < 1 or 1000 % mask_steps):
        raise ValueError(f"--mask-steps {mask_steps}: must divide 1000 (DDPM)")
    if mask_steps < 1:
        raise ValueError(f"--mask-steps {mask_steps}: must be >= 1")
    return variant, dict(size=size, spacing=spacing, modality_code=code, steps=steps, guidance_scale=guidance,
                         anatomy=anatomy, anatomy_size_db=anatomy_db, mask_steps=mask_steps, sampler=request.sampler,
                         body_region=tuple(request.body_region), **mask_opts)


def _anatomy_sizes(request: GenerateRequest, organ_sizes) -> tuple[list[float], dict | None]:
    """The anatomy-size vector, unset slots filled from NVIDIA's database when there is one (else -1)."""
    from fastmaisi.labels import anatomy_size_vector
    from fastmaisi.pipelines.anatomy_db import complete_anatomy_sizes, find_anatomy_size_db

    anatomy_size_vector(organ_sizes)  # checks names and values first
    return complete_anatomy_sizes(organ_sizes, find_anatomy_size_db(request.anatomy_size_db, request.weights))


def _say_sizes_left_unset(request: GenerateRequest, opts: dict) -> None:
    """One line when sizes the user left out stay -1 for want of NVIDIA's database (after all checks passed)."""
    from fastmaisi.pipelines.anatomy_db import DB_NAME

    anatomy = opts.get("anatomy")  # (None for the v2 mask generator, which takes one size target)
    if request.organ_sizes and anatomy is not None and opts["anatomy_size_db"] is None \
            and len(request.organ_sizes) < len(anatomy):
        print(f"organ sizes not given stay -1: no {DB_NAME} in --weights (NVIDIA fills them from its closest entry; "
              "pass --anatomy-size-db FILE)", file=sys.stderr)


def _guidance_scale(request: GenerateRequest, variant) -> float:
    """The workflow's one CFG scale: --modality-guidance-scale (image only) or --tumour-guidance-scale (mask
    workflows), else --guidance-scale, else the variant's."""
    purpose = request.modality_guidance_scale if request.workflow == "image" else request.tumour_guidance_scale
    for scale in (purpose, request.guidance_scale):
        if scale is not None:
            if scale < 0:
                raise ValueError(f"guidance scale {scale}: must be >= 0 (0: off)")
            return float(scale)
    return variant.guidance_scale


def _mask_generator(request: GenerateRequest, variant) -> tuple:
    """(variant set to the chosen mask generator, its options for `opts`). Default: v2 when its weights are in the
    weights folder (said in one line), else v1. v2 inputs are checked as NVIDIA's `check_input_ct` does."""
    from fastmaisi import mask_conditions as mc

    paired = request.workflow == "paired"
    choice = request.mask_generator
    auto = choice is None and paired and "mask_diffusion" in variant.files and bool(request.weights)
    if auto:  # (the built-in demo keeps v1 unless asked: its v2 generator is a quick CPU-trained toy)
        found = any((Path(request.weights) / f"{variant.v2_mask_file}{ext}").is_file()
                    for ext in (".pt", ".safetensors"))
        choice = "v2" if found else "v1"
    source = (f"{variant.v2_mask_file} {'found' if choice == 'v2' else 'not found'} in --weights" if auto
              else "--mask-generator" if request.mask_generator else "default")
    choice = choice or "v1"
    if choice == "v1":
        if request.demographics:
            raise ValueError("--demographic needs the v2 mask generator (--mask-generator v2)")
        if request.mask_guidance_scale is not None:
            raise ValueError("--mask-guidance-scale is for the v2 mask generator (--mask-generator v2)")
        return variant, {"mask_generator": "v1", "mask_generator_source": source}
    if "mask_diffusion" not in variant.files:
        raise ValueError(f"--mask-generator v2: variant {variant.name} has no mask generator (a CT variant has)")
    organ_sizes = dict(request.organ_sizes)
    demographics = {k: mc.parse_demographic(k, v) for k, v in request.demographics.items()}
    try:
        messages = mc.check_conditions(organ_sizes, demographics)
    except ValueError as err:
        raise ValueError(f"{err}{' (or --mask-generator v1)' if auto else ''}") from None
    for message in messages:
        warnings.warn(message, stacklevel=3)
    guidance = mc.V2_GUIDANCE_SCALE if request.mask_guidance_scale is None else request.mask_guidance_scale
    if guidance < 0:
        raise ValueError(f"--mask-guidance-scale {guidance}: must be >= 0 (0: off)")
    return variant.with_mask_generator("v2"), {
        "mask_generator": "v2", "mask_generator_source": source,
        "mask_condition": mc.condition_vector(organ_sizes, demographics),
        "mask_guidance_scale": float(guidance), "default_mask_steps": mc.V2_STEPS}


def generate(request: GenerateRequest, progress: bool = True, dry_run: bool = False, *, manifest: str | None = None,
             shard=None, on_sample=None) -> list[dict]:
    """Run a request (or the rows of a `manifest` on top of it) into its output folder, resuming an earlier run of
    the same request there; returns one dict per sample of this shard (paths, record, "kept": made earlier).
    `shard`: --shard I/N (composed with torchrun ranks and Slurm arrays, see `shards`); `on_sample(result)` is called
    as each sample is written. See DESIGN: plan, mask, condition, sample, decode, check, write."""
    import torch

    from fastmaisi import io
    from fastmaisi.pipelines import models as model_io
    from fastmaisi.pipelines.manifest import read_manifest
    from fastmaisi.pipelines.run_folder import RunFolder, fingerprint
    from fastmaisi.pipelines.samples import plan_samples
    from fastmaisi.pipelines.shards import current_shard

    # 1. plan: inputs, manifest rows, weights and outputs are checked before anything heavy happens
    variant, opts = resolve(request)
    rows = read_manifest(manifest, GenerateRequest) if manifest else None
    samples = plan_samples(request, resolve, rows, manifest)
    workflows = {s.request.workflow for s in samples}
    roles = ["autoencoder", "diffusion_unet"]
    if workflows != {"image"}:
        roles.append("controlnet")
    if "paired" in workflows:
        roles += ["mask_autoencoder", "mask_diffusion"]
    weights_dir = _weights_dir(request, variant, roles, opts, dry_run)
    _say_sizes_left_unset(request, opts)
    if "--weights" in opts.get("mask_generator_source", ""):  # the automatic choice, said once the run goes ahead
        print(f"mask generator: {opts['mask_generator']} ({opts['mask_generator_source']}; --mask-generator "
              "picks)", file=sys.stderr)
    masks = {}  # the command line's mask (or mask database) is read and checked now; manifest rows' when made
    if request.mask and not manifest:
        masks[_mask_key(request, opts)] = _load_user_mask(request, opts, request.mask)
    elif request.mask_db and not manifest:
        from fastmaisi.pipelines.mask_db import rank_candidates

        masks[_mask_key(request, opts)] = rank_candidates(request.mask_db, opts["size"], opts["spacing"])
    rank, world, local_rank = _torchrun_rank()
    my_shard = current_shard(shard)
    mine = [s for s in samples if my_shard.takes(s.index)]
    if request.output_stem:  # --from-record: the sample keeps its original name
        mine = [dataclasses.replace(s, stem=request.output_stem) for s in mine[:1]]
    device = _device(request.device, local_rank if world > 1 else None)
    budget = int(request.memory_budget_gb * 2**30) if request.memory_budget_gb else None
    decode_devices = _decode_devices(request.decode_devices)
    from fastmaisi.pipelines.preflight import check_resources

    decode_plan = _decode_plan(opts, device, budget, variant=variant, devices=decode_devices)
    resources = check_resources(variant, request.workflow, opts, device, budget, request.output_dir, len(mine),
                                decode_plan)
    if dry_run:
        from fastmaisi.pipelines.estimate import sampling_plan

        plan = sampling_plan(variant, request.workflow, opts, device, resources.costs)
        print(f"Plan (dry run: nothing is written)\n{plan}\n{decode_plan.describe()}\n{resources.describe()}\n"
              f"{len(mine)} of {len(samples)} samples in shard {my_shard}")
        return []
    if resources.refusal() and not request.force:
        raise ValueError(resources.refusal())
    if request.fmt == "dicom":  # pydicom and highdicom are optional: found missing now, not after the compute
        try:
            io._require_dicom(highdicom=True)
        except ImportError as exc:
            raise ValueError(f"--format dicom: {exc}") from None
    existed = Path(request.output_dir).is_dir()
    io.check_output_dir(request.output_dir, [s.stem for s in mine], overwrite=True)  # writable; resume decides
    job_fp = fingerprint(request, _mask_sha(request))
    job = {"request": asdict(request), "manifest": str(Path(manifest).resolve()) if manifest else None}
    try:
        folder = RunFolder(request.output_dir, job_fp, job, my_shard, overwrite=request.overwrite).__enter__()
    except BaseException:
        if not existed:
            _remove_empty(Path(request.output_dir))
        raise
    try:
        plan = folder.sort(mine, lambda s: fingerprint(s.request, s.mask_sha256, s.stem))
        results = [{"paths": _record_paths(request.output_dir, r), "record": r, "kept": True} for r in plan.kept]
        if plan.todo:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
            models = model_io.load_models(variant, weights_dir, roles, device=device, dtype=dtype,
                                          network_config=request.network_config)
            models.cuda_graphs = request.cuda_graphs
            models.decode_devices = decode_devices
            _check_kept_weights(plan.kept, models.files, request.output_dir)
            made = _make_samples(plan.todo, len(mine), len(plan.kept), models, variant, device, budget, job_fp,
                                 my_shard, (rank, world), progress, on_sample, masks)
            results += made
        from fastmaisi.dataset_index import write_index

        write_index(request.output_dir)
    except BaseException:
        folder.close()
        if not existed:
            _remove_empty(Path(request.output_dir))
        raise
    folder.close()
    return results


def _make_samples(todo, total, done, models, variant, device, budget, job_fp, shard, rank_world, progress,
                  on_sample, masks) -> list[dict]:
    """Stages 2-7 for each sample: the GPU stages here, the quality check and the writing on a worker thread (the
    GPU goes on with the next sample); a failed check sends the sample back with the next seed."""
    import queue
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from fastmaisi import io
    from fastmaisi.pipelines.run_folder import fingerprint
    from fastmaisi.pipelines.writer import BackgroundWriter

    plans, results, retries = {}, [], queue.Queue()
    bar = tqdm(total=total, initial=done, desc="samples", unit="sample", disable=not progress, dynamic_ncols=True)

    def finish(work):  # worker thread: 6. check, then retry or 7. write
        sample, image_hu, label = work["sample"], work.pop("image_hu"), work.pop("label")
        qc = _quality(variant, image_hu, label)
        work["attempts"][-1]["quality_check"] = qc
        if qc is not None and not qc["passed"] and len(work["attempts"]) <= sample.request.max_retries:
            retries.put(work)
            return
        record = _record(sample.request, variant, sample.opts, models, work["attempts"], work["plan"], device,
                         work["attempts"][-1]["mask"])
        record["rank"], record["world_size"] = rank_world
        record["sample"] = {"index": sample.index, "name": sample.stem, "manifest_line": sample.line,
                            "shard": str(shard)}
        record["fingerprint"] = {"job": job_fp, "sample": fingerprint(sample.request, sample.mask_sha256, sample.stem)}
        record["deflate"] = io.nifti.deflate_name() if sample.request.fmt == "nifti" else None
        out_affine = work["out_affine"]
        if out_affine is not None:  # made from a user's mask: its world geometry (origin, axis directions)
            from fastmaisi.segmentations.geometry import from_ras

            image_hu, label = from_ras(image_hu, out_affine), from_ras(label, out_affine)
        paths = io.write_outputs(sample.request.output_dir, sample.stem, image_hu, label, sample.opts["spacing"],
                                 record, fmt=sample.request.fmt, overwrite=True, modality=variant.modality,
                                 affine=out_affine)
        result = {"paths": paths, "record": record, "kept": False}
        results.append(result)
        bar.update(1)
        if on_sample is not None:
            on_sample(result)

    writer = BackgroundWriter(finish)
    reader, prefetched = ThreadPoolExecutor(1, thread_name_prefix="fastmaisi-mask"), {}
    pending = deque({"sample": s, "attempts": []} for s in todo)
    try:
        while True:
            try:
                work = retries.get_nowait()
            except queue.Empty:
                work = pending.popleft() if pending else None
            if work is None:
                writer.wait_idle()  # the last samples' checks may still send one back
                if retries.empty():
                    break
                continue
            sample, k = work["sample"], len(work["attempts"])
            seed = sample.request.seed + k * RETRY_SEED_STRIDE
            user_label, mask_info, out_affine = None, None, None
            key = _mask_key(sample.request, sample.opts)
            if pending and pending[0]["sample"].request.mask and id(pending[0]) not in prefetched:
                nxt = pending[0]["sample"]  # the next row's mask is read on a thread while this one computes
                if _mask_key(nxt.request, nxt.opts) not in masks:
                    prefetched[id(pending[0])] = reader.submit(_load_user_mask, nxt.request, nxt.opts,
                                                               nxt.request.mask)
            if sample.request.mask:
                ahead = prefetched.pop(id(work), None)
                user_label, mask_info, out_affine = (ahead.result() if ahead else masks.get(key)
                                                     or _load_user_mask(sample.request, sample.opts,
                                                                        sample.request.mask))
            elif sample.request.mask_db:  # sample i starts at the i-th best mask; each retry takes the next one
                if key not in masks:
                    from fastmaisi.pipelines.mask_db import rank_candidates

                    masks[key] = rank_candidates(sample.request.mask_db, sample.opts["size"], sample.opts["spacing"])
                ranked = masks[key]
                user_label, mask_info, out_affine = _load_user_mask(sample.request, sample.opts,
                                                                    ranked[(sample.index + k) % len(ranked)], "maisi")
            t0 = time.perf_counter()
            image_hu, label, timings = one_volume(models, sample.request.workflow, sample.opts, seed, user_label,
                                                  budget, progress)
            work["attempts"].append({"seed": seed, "quality_check": None,
                                     "seconds": round(time.perf_counter() - t0, 2), "timings": timings,
                                     "mask": mask_info})
            size = tuple(sample.opts["size"])
            if size not in plans:
                plans[size] = _plan_text(sample.opts, device, budget, models.autoencoder,
                                         devices=models.decode_devices)
            work.update(image_hu=image_hu, label=label, plan=plans[size], out_affine=out_affine)
            writer.submit(work)
        writer.close()
    except BaseException:
        writer.close(raise_error=False)  # Ctrl-C or an error: the samples already made are still written
        raise
    finally:
        reader.shutdown(cancel_futures=True)
        bar.close()
    return results


def _mask_key(request, opts) -> tuple:
    """What a loaded mask (or ranked mask database) depends on."""
    return (request.mask, request.mask_db, request.strict_mask, tuple(opts["size"]), tuple(opts["spacing"]))


def _mask_sha(request) -> str | None:
    from fastmaisi.pipelines.samples import _mask_sha as sha

    return sha(request.mask)


def _remove_empty(folder: Path) -> None:
    """Remove a folder this run created when it stopped before any sample was written (only bookkeeping in it)."""
    import shutil

    from fastmaisi.dataset_index import INDEX_FILE
    from fastmaisi.pipelines.run_folder import JOB_FILE

    if folder.is_dir() and all(p.name.startswith(".fastmaisi") or p.name in (JOB_FILE, INDEX_FILE)
                               for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)


def _record_paths(out_dir, record) -> dict:
    return {kind: Path(out_dir) / o["file"] for kind, o in (record.get("outputs") or {}).items()}


def _check_kept_weights(kept, files, out_dir) -> None:
    """Samples kept from an earlier run must come from the same weight files (the fingerprint leaves out their path)."""
    loaded = {role: f["sha256"] for role, f in files.items()}
    for record in kept:
        used = {role: f.get("sha256") for role, f in (record.get("weights") or {}).items() if role in loaded}
        if any(loaded[role] != sha for role, sha in used.items()):
            name = (record.get("sample") or {}).get("name", "a sample")
            raise ValueError(f"{name} in {str(out_dir)!r} was made with other weight files (their SHA-256 differs): "
                             "rerun with the weights that made it, or choose another folder")


def one_volume(models, workflow, opts, seed, user_label, budget, progress):
    """Stages 2-5 for one seed: mask (paired), condition, sample, decode. Returns (image_hu, label or None, timings)."""
    from fastmaisi.pipelines import common, from_mask, image, paired
    import torch

    from fastmaisi.pipelines.mask_postprocess_torch import postprocess_any

    timings = {}
    t = time.perf_counter()
    label = user_label
    if workflow == "paired":
        # 2. mask: organ sizes (v1: DDPM mask DM) or the 19 numbers (v2: guided rflow-mask) -> mask VAE -> 132-label
        # map on the mask grid, cleaned for the set tumour where it was decoded (GPU; a CPU run: scipy on the
        # host), timed apart -> the output grid
        if opts.get("mask_generator") == "v2":
            from fastmaisi.pipelines import paired_v2

            z = paired_v2.sample_mask_latent_v2(models, opts["mask_condition"], seed=seed,
                                                latent_shape=models.mask_latent_shape, steps=opts["mask_steps"],
                                                guidance_scale=opts["mask_guidance_scale"], progress=progress)
            clean = lambda m: paired_v2.postprocess_v2(m, opts["mask_condition"])  # noqa: E731
        else:
            z = paired.sample_mask_latent(models, opts["anatomy"], seed=seed, latent_shape=models.mask_latent_shape,
                                          steps=opts["mask_steps"], progress=progress)
            clean = lambda m: postprocess_any(m, opts["anatomy"])  # noqa: E731
        decoded = paired.decode_mask(models, z, budget, progress, on_device=models.device.type == "cuda")
        t_post = time.perf_counter()
        raw = clean(decoded)
        if isinstance(raw, torch.Tensor) and raw.is_cuda:
            torch.cuda.synchronize(raw.device)
        timings["mask_postprocess_s"] = round(time.perf_counter() - t_post, 2)
        label = common.resample_label(raw, models.mask_spacing, opts["size"], opts["spacing"], device=models.device)
        timings["mask_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
    # 3-4. condition + sample
    common_kw = dict(spacing=opts["spacing"], modality_code=opts["modality_code"], steps=opts["steps"],
                     guidance_scale=opts["guidance_scale"], seed=seed, progress=progress,
                     sampler=opts["sampler"])
    if label is None:
        z = image.sample_image_latent(models, size=opts["size"], body_region=opts["body_region"], **common_kw)
    else:
        z = from_mask.sample_latent_from_mask(models, label, **common_kw)
    timings["sample_s"] = round(time.perf_counter() - t, 2)
    # 5. decode: exact whole-volume decode -> HU
    t = time.perf_counter()
    unit = common.decode_to_unit(models, z, budget, progress)[0, 0]
    if label is not None:
        unit = from_mask.blank_outside_body(unit, label)
    image_hu, label = _for_writing(unit, label, models.variant.modality)
    timings["decode_s"] = round(time.perf_counter() - t, 2)
    return image_hu, label, timings


def _for_writing(unit, label, modality):
    """The decoded volume (X, Y, Z) tensor -> int16 intensities, and the label map -> uint8 when its ids fit, both as
    Fortran-ordered host arrays (same shapes and values): NIfTI stores x fastest, so the writer thread streams them
    as they are instead of transposing 512^3 volumes on the host (seconds); the transposes run where the decoded
    volume is (milliseconds on a GPU)."""
    import torch

    from fastmaisi.io import hu_from_unit

    image_hu = hu_from_unit(unit.permute(2, 1, 0).contiguous(), modality).T
    if label is not None:
        t = torch.as_tensor(label).to(unit.device)
        if t.numel() and 0 <= int(t.min()) and int(t.max()) <= 255:  # (else the writer refuses it, with the values)
            t = t.to(torch.uint8)
        label = t.permute(2, 1, 0).contiguous().cpu().numpy().T
    return image_hu, label


def _quality(variant, image_hu, label):
    if variant.modality != "ct" or label is None:
        return None
    from fastmaisi.labels import quality_check

    result = quality_check(image_hu, label)
    return {"passed": bool(result.passed), "failed": list(result.failed),
            "medians": {k: (None if v is None else float(v)) for k, v in result.medians.items()}}


def _load_user_mask(request, opts, path, vocabulary=None):
    """A user's segmentation (or a database candidate) in MAISI ids on the requested grid, its record, and the world
    affine of the outputs (`fastmaisi.segmentations`: vocabulary, mapping, body 200, geometry)."""
    from fastmaisi.segmentations.mask_input import load_mask

    return load_mask(path, vocabulary or request.mask_vocabulary, opts["size"], opts["spacing"],
                     strict=request.strict_mask)


def _torchrun_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the variables torchrun sets for each process; (0, 1, 0) otherwise."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def _device(name: str, local_rank: int | None = None):
    """The torch device for --device `name`; under torchrun (`local_rank` given) "auto" and a bare "cuda" mean
    cuda:<local rank>. A CUDA device also becomes the process's current device: the Triton GroupNorm kernels launch
    on the current device, so without it every rank's kernels would run on GPU 0."""
    import torch

    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    device = torch.device("cuda" if name == "auto" else name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _weights_dir(request: GenerateRequest, variant, roles, opts, dry_run: bool) -> Path | None:
    """The folder the networks load from, its files checked now: --weights, or the built-in demo's; None for a
    dry run of a named variant without --weights (a plan needs the config, not the weights)."""
    from fastmaisi.pipelines.models import missing_weight_files

    if request.weights:
        weights_dir = Path(request.weights)
        if not weights_dir.is_dir():
            raise ValueError(f"--weights {request.weights}: not a folder with the {variant.name} weight files")
        missing = missing_weight_files(variant, weights_dir, roles)
        if missing:
            raise ValueError(f"--weights {weights_dir}: missing {', '.join(missing)}")
        return weights_dir
    if variant.name != "demo":
        if dry_run:
            return None
        raise ValueError(f"no --weights given: pass --weights DIR, a folder with the {variant.name} weight files "
                         "(official .pt or converted .safetensors), or leave out --variant to run the built-in demo")
    from fastmaisi.variants import DEMO_WEIGHTS_DIR

    print(f"no --weights: the built-in demo networks ({'x'.join(map(str, opts['size']))} phantom-trained toys, not "
          "real CT; fastmaisi/data/demo)", file=sys.stderr)
    missing = missing_weight_files(variant, DEMO_WEIGHTS_DIR, roles) if DEMO_WEIGHTS_DIR.is_dir() else ["the folder"]
    if missing:
        raise ValueError(f"the built-in demo weights are not installed ({DEMO_WEIGHTS_DIR}: missing "
                         f"{', '.join(missing)}); reinstall fastmaisi, run scripts/train_demo.py, or pass --weights DIR")
    return DEMO_WEIGHTS_DIR


def _decode_devices(names):
    """--decode-devices as torch devices (None: the one-device decode); each checked to exist."""
    if not names:
        return None
    import torch

    devices = []
    for name in names:
        try:
            dev = torch.device(name)
        except RuntimeError:
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cuda" and not (
                torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count())):
            raise ValueError(f"--decode-devices {','.join(names)}: {name!r} is not a device of this machine")
        devices.append(torch.device("cuda", 0) if dev.type == "cuda" and dev.index is None else dev)
    if len({d.type for d in devices}) > 1:
        raise ValueError(f"--decode-devices {','.join(names)}: give devices of one kind (all cuda, or all cpu)")
    return devices


def _plan_text(opts, device, budget, vae=None, variant=None, devices=None) -> str:
    """Steps and the decode's memory/time plan, for the record."""
    plan = _decode_plan(opts, device, budget, vae, variant, devices)
    return f"{opts['steps']} sampling steps at latent {tuple(plan.input_shape[2:])} on {device}. {plan.describe()}"


def _decode_plan(opts, device, budget, vae=None, variant=None, devices=None):
    """The decode's plan (of `vae`, else of the variant's autoencoder built without weights); with `devices`, the
    plan of the decode split over them."""
    import torch

    from fastmaisi.decode import plan_decode

    if vae is None and variant is not None:
        from fastmaisi.nets import build

        with torch.device("meta"):
            vae = build(variant.definitions()["autoencoder"])

    latent = (1, 4, *[s // 4 for s in opts["size"]])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if devices:
        from fastmaisi.decode.split import plan_split

        return plan_split(latent, devices, budget, dtype, vae=vae)
    return plan_decode(latent, device, budget, dtype, vae=vae)


def _record(request, variant, opts, models, attempts, plan, device, mask_info) -> dict:
    import torch

    from fastmaisi import __version__

    return {"fastmaisi_version": __version__, "torch": torch.__version__, "variant": variant.name,
            "workflow": request.workflow, "request": asdict(request),
            "resolved": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()},
            "mask": mask_info, "weights": models.files, "scale_factor": models.scale_factor,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "dtype": str(models.dtype), "decode_plan": plan, "attempts": attempts,
            "seed": attempts[-1]["seed"], "quality_check": attempts[-1]["quality_check"],
            "retries": len(attempts) - 1}
