"""Output files people can open and trust: NIfTI or DICOM volumes, a JSON provenance record, a preview PNG.

Modules: `volumes` (intensities, geometry), `atomic` (staged writes), `nifti`, `dicom`, `label_maps` (reading),
`preview`, `record`, `outputs` (one output set). Every public name is importable from `fastmaisi.io`.

Output layout, for one output named STEM in the output folder:

    STEM_image.nii.gz      int16 NIfTI: CT in HU clipped to [-1000, 1000]; MR in arbitrary units >= 0 (nominal 0..1000)
    STEM_label.nii.gz      uint8 NIfTI label map (label ids as in label_dict.json; 0 = background, 200 = body)
    STEM_labels.json       the label ids present, with name, RGB colour (the preview's), voxel count and volume in mL
    STEM_preview.png       axial | coronal | sagittal mid-slices, CT window [-160, 240] HU, labels blended in colour
    STEM_record.json       the provenance record (schema below); written last, so its presence marks a complete set
  with fmt="dicom", instead of the two NIfTI files:
    STEM_image_dicom/      a DICOM series, one file per axial slice (IM_00001.dcm, ...), CT or MR Image Storage
    STEM_label_seg.dcm     the label map as a DICOM SEG (binary, one segment per label id present), on the series' frame

Geometry. Arrays are indexed (X, Y, Z) in RAS+ (nibabel's canonical orientation): index x grows toward the patient's
Right, y toward Anterior, z toward Superior. The affine is diag(spacing) with the origin (the world position of voxel
(0, 0, 0), 0 by default) as translation; qform and sform both carry it (code 1, scanner), units mm. DICOM uses LPS:
the series is written as standard axial slices (ImageOrientationPatient 1\\0\\0\\0\\1\\0, so rows run anterior to
posterior and columns patient-right to patient-left), which is the RAS volume flipped in x and y; the world positions
are the same points. Outputs made from a user's mask (`generate --mask`) keep that mask's world geometry: NIfTI in
its axis orientation (LPS stays LPS) with the origin of the generated grid; DICOM and the preview as above. Every file is written under a temporary hidden name in its final folder and renamed into place
only when the whole set is written, so an interrupted or failed run never leaves a file that looks complete.

Record schema (`fastmaisi-record/1`). `write_record` fills schema, version and time, and sets every documented key
that is missing to null; extra keys are kept; non-finite floats are stored as null. `read_record` checks the schema and
the required keys; `fastmaisi generate --from-record FILE` reruns `request` with `seed`.
    schema               "fastmaisi-record/1"
    fastmaisi_version    package version that wrote it (also "torch": torch version)
    created_utc          ISO 8601 time
    variant              required: "rflow-ct" | "ddpm-ct" | "rflow-mr" | "rflow-mr-brain"
    request              required: every input as given (the GenerateRequest fields: size, spacing, modality,
                         organ_sizes, body_region, mask, steps, guidance_scale, seed, ...)
    seed                 required: int, the seed that made this output
    workflow             "image" | "from-mask" | "paired"
    resolved             the inputs after defaults: size [X, Y, Z], spacing [sx, sy, sz] mm, modality_code, steps,
                         guidance_scale, anatomy (organ-size vector), mask_steps
    mask                 the user's mask: {"path", "sha256", "spacing", "shape", "body_added", "vocabulary",
                         "conversion" (mapping, unmapped, body, per-class volumes in mL), "geometry"} or null
    weights              {role: {"path", "sha256"}} of every checkpoint used; scale_factor: the latent scale
    device, dtype        e.g. "cuda:0 (NVIDIA H100 80GB HBM3)", "torch.float16"
    decode_plan          how the VAE decode was tiled / the memory plan
    attempts             [{"seed", "quality_check", "seconds", "timings": {stage: s}}], one per try, last = this one
    quality_check        the last attempt's {"passed", "failed", "medians"} (CT with a label map) or null
    retries              attempts that failed the quality check before this one
    geometry             (write_outputs) {"shape", "spacing", "origin", "orientation" (axis codes: "RAS", or the
                         user's mask's, e.g. "LPS"), "affine"}
    outputs              (write_outputs) {kind: {"file", "format", "sha256" and "bytes" (files) or "files" (DICOM
                         folder)}}
  written by `generate` besides (see docs/datasets.md):
    sample               {"index", "name", "manifest_line", "shard": "I/N"}; also "rank", "world_size" (torchrun)
    fingerprint          {"job", "sample"}: SHA-256 (32 hex) of the inputs that decide the files; a rerun keeps a
                         complete sample whose fingerprint matches
    deflate              "isal" | "zlib": the deflate that wrote the .nii.gz files (null for DICOM)
A `generate` output folder also holds `job.json` (the request that owns it), `index.csv` (one row per complete
sample) and hidden `.fastmaisi*.lock` files.
"""

from fastmaisi import __version__
from fastmaisi.io.dicom import SYNTHETIC_PATIENT, _require_dicom
from fastmaisi.io.label_maps import read_label_map
from fastmaisi.io.nifti import SYNTHETIC_DESCRIPTION, write_nifti
from fastmaisi.io.outputs import LABELS_SCHEMA, check_output_dir, label_table, output_paths, write_outputs
from fastmaisi.io.preview import WINDOWS, label_color, preview_image, preview_png
from fastmaisi.io.record import RECORD_SCHEMA, read_record, validate_record, write_record
from fastmaisi.io.volumes import CT_HU_RANGE, MR_RANGE, hu_from_unit, is_ct, ras_affine

__all__ = ["CT_HU_RANGE", "LABELS_SCHEMA", "MR_RANGE", "RECORD_SCHEMA", "SYNTHETIC_DESCRIPTION", "SYNTHETIC_PATIENT",
           "WINDOWS", "__version__", "_require_dicom", "check_output_dir", "hu_from_unit", "is_ct", "label_color",
           "label_table", "output_paths", "preview_image", "preview_png", "ras_affine", "read_label_map", "read_record",
           "validate_record", "write_nifti", "write_outputs", "write_record"]
