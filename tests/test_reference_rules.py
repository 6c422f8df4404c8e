"""The stages around the sampler follow NVIDIA's pipeline: MR clipping, label resampling (MONAI's Spacing +
ResizeWithPadOrCrop as the oracle), the tumour-free mask of tumour guidance (MONAI's dilate as the oracle of the
ring), the spacing condition's fp16 rounding, and the organ sizes filled from NVIDIA's anatomy-size database."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastmaisi.pipelines import common, from_mask
from fastmaisi.pipelines.common import resample_label

monai_transforms = pytest.importorskip("monai.transforms")


# ------------------------------------------------------------------------------------------------ 1. MR intensities
@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_decoded_mr_is_clipped_at_zero_only(monkeypatch, modality):
    """Reference: CT clipped to [0, 1] before x*2000-1000; MR clipped below at 0 only, then x*1000."""
    from fastmaisi.io import hu_from_unit

    unit = torch.tensor([-0.2, 0.3, 1.0, 1.5]).view(1, 1, 1, 1, 4)
    monkeypatch.setattr("fastmaisi.decode.decode_latent", lambda vae, z, **kw: unit.clone())
    models = SimpleNamespace(scale_factor=1.0, dtype=torch.float32, autoencoder=torch.nn.Identity(), decode_devices=None,
                             variant=SimpleNamespace(modality=modality))
    out = common.decode_to_unit(models, torch.zeros(1, 4, 1, 1, 1))
    values = hu_from_unit(out[0, 0], modality).ravel().tolist()
    assert values == ([-1000, -400, 1000, 1000] if modality == "ct" else [0, 300, 1000, 1500])


# ------------------------------------------------------------------------------------------ 2. label resampling
def _monai_resample(label, spacing, size, new_spacing):
    from monai.data import MetaTensor

    t = MetaTensor(torch.from_numpy(label.astype(np.float32))[None], affine=torch.diag(torch.tensor([*spacing, 1.0],
                                                                                                     dtype=torch.float64)))
    t = monai_transforms.ResizeWithPadOrCrop(size)(monai_transforms.Spacing(pixdim=new_spacing, mode="nearest")(t))
    return t[0].numpy().astype(np.int16)


# spacing pairs where no output voxel falls exactly half-way between two source voxels
EXACT = [((20, 17, 9), (1.5, 1.5, 1.5), (16, 16, 8), (1.0, 1.0, 1.0)),  # mask grid -> finer output, crop
         ((21, 18, 11), (0.75, 0.781, 2.5), (32, 32, 16), (1.0, 0.7, 1.5)),  # mixed, pad
         ((16, 16, 16), (1.5, 1.5, 1.5), (32, 32, 32), (0.75, 0.75, 0.75)),
         ((19, 19, 19), (1.0, 1.0, 1.0), (8, 9, 10), (0.6, 1.4, 2.2)),
         ((30, 30, 30), (1.5, 1.5, 1.5), (20, 20, 20), (1.5, 1.5, 1.5))]  # same spacing: centre crop only


@pytest.mark.parametrize("shape,spacing,size,new_spacing", EXACT)
def test_label_resampling_matches_monai_spacing_then_resize_with_pad_or_crop(shape, spacing, size, new_spacing):
    """Reference rule: length round((n-1)*s/ns + 1), voxel i <- source round(i*ns/s), then centre pad/crop."""
    label = np.random.default_rng(0).integers(0, 133, shape).astype(np.int16)
    ours = resample_label(label, spacing, size, new_spacing)
    assert ours.shape == tuple(size) and ours.dtype == np.int16
    assert np.array_equal(ours, _monai_resample(label, spacing, size, new_spacing))


def test_label_resampling_at_half_voxel_ties_is_within_monais_float_noise():
    """Where i*ns/s is exactly k + 1/2, MONAI's float32 grid picks k or k+1 by rounding noise; we take the even one.
    Every voxel comes from one of the two nearest source voxels, and most agree exactly."""
    shape, spacing, size, new_spacing = (20, 17, 9), (1.0, 1.0, 1.0), (16, 16, 8), (1.5, 1.5, 1.5)
    index = np.arange(np.prod(shape)).reshape(shape).astype(np.float64)
    ours = resample_label(index.astype(np.int16), spacing, size, new_spacing)
    theirs = _monai_resample(index, spacing, size, new_spacing)
    assert ours.shape == theirs.shape
    src_ours = np.stack(np.unravel_index(ours.astype(np.int64), shape))
    src_theirs = np.stack(np.unravel_index(theirs.astype(np.int64), shape))
    assert np.abs(src_ours - src_theirs).max() <= 1
    assert (ours == theirs).mean() > 0.6


# --------------------------------------------------------------------------------------- 4. tumour-free mask
def _monai_ring(tumour):
    from monai.transforms.utils_morphological_ops import dilate

    grown = dilate(torch.from_numpy(tumour.astype(np.float32))[None, None], 3, pad_value=1.0)[0, 0].numpy() > 0
    return grown & ~tumour


def test_lung_tumour_takes_the_majority_lobe_of_its_ring_not_of_the_map():
    """remove_tumors_majority_vote: the ring (3^3 dilation, outside counted as tumour, less the tumour), lobes only."""
    label = np.full((24, 24, 24), 200, np.uint8)
    label[2:22, 2:22, 2:12] = 28  # the biggest lobe of the map
    label[2:22, 2:22, 12:22] = 30
    label[8:12, 8:12, 14:18] = 23  # the tumour sits in lobe 30
    out = from_mask.remove_tumours(label)
    ring = _monai_ring(label == 23)
    values, counts = np.unique(label[ring & np.isin(label, (28, 29, 30, 31, 32))], return_counts=True)
    assert values[counts.argmax()] == 30
    assert (out[8:12, 8:12, 14:18] == 30).all()  # the map-wide majority (28) would give 28
    assert np.array_equal(out[label != 23], label[label != 23])


def test_ring_counts_the_volume_faces_and_falls_back_to_the_map():
    """The reference dilates with the outside set: lobe voxels on the volume's faces join every tumour's ring."""
    label = np.full((12, 12, 12), 200, np.uint8)
    label[0, :, :] = 31  # a face of lobe 31, far from the tumour
    label[5:7, 5:7, 5:7] = 23
    assert (from_mask.remove_tumours(label)[5:7, 5:7, 5:7] == 31).all()
    assert _monai_ring(label == 23)[0].all()
    label[0, :, :] = 200
    label[3:9, 3:9, 1] = 29  # no lobe touches the ring: the map's most frequent lobe
    assert (from_mask.remove_tumours(label)[5:7, 5:7, 5:7] == 29).all()


def test_other_tumours_go_to_their_host_and_176_to_brain():
    label = np.array([26, 24, 27, 116, 117, 176, 128, 1], np.uint8).reshape(2, 2, 2)
    assert from_mask.remove_tumours(label).ravel().tolist() == [1, 4, 62, 14, 5, 22, 128, 1]


# ------------------------------------------------------------------------------------------ 5. spacing rounding
def test_spacing_condition_is_rounded_in_fp16_first_in_the_mask_paths(monkeypatch):
    """From-mask and paired paths: fp16(fp16(s) * 100); image-only keeps s * 100."""
    assert common.spacing_tensor((0.781, 1.5, 2.0), "cpu", torch.float32, fp16_first=True).tolist() == [
        [78.0625, 150.0, 200.0]]
    assert common.spacing_tensor((0.781,), "cpu", torch.float16).tolist() == [[78.125]]
    seen = {}

    def capture(unet, controlnet=None, **kw):
        seen.update(kw)
        raise RuntimeError("captured")

    monkeypatch.setattr(from_mask, "image_denoiser", capture)
    unet = torch.nn.Conv3d(1, 1, 1)
    models = SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, diffusion_unet=unet, controlnet=None,
                             variant=SimpleNamespace(body_region=False))
    with pytest.raises(RuntimeError, match="captured"):
        from_mask.sample_latent_from_mask(models, np.zeros((8, 8, 8), np.uint8), spacing=(0.781, 0.781, 1.0),
                                          modality_code=1, steps=1, guidance_scale=0.0, seed=0, progress=False)
    assert seen["spacing"].tolist() == [[78.0625, 78.0625, 100.0]]


# ----------------------------------------------------------------------------------- 6. anatomy-size database
DB = [{"organ_size": [0.1, 0.2, 0.3, 0.4, 0.5, -1, -1, -1, -1, -1]},
      {"organ_size": [0.6, 0.5, 0.7, 0.8, 0.9, -1, -1, 0.05, -1, -1]}]


def _request(tmp_path, **kw):
    from fastmaisi.pipelines.generate import GenerateRequest

    return GenerateRequest(output_dir=str(tmp_path / "out"), variant="rflow-ct", organ_sizes={"liver": 0.45}, **kw)


def test_unset_organ_sizes_come_from_the_closest_database_entry(tmp_path, capsys):
    """sample.py's prepare_anatomy_size_condition: L1 over the user's slots, closest entry, user's values on top."""
    from fastmaisi.pipelines.generate import resolve

    (tmp_path / "datasets").mkdir()
    db = tmp_path / "datasets" / "all_anatomy_size_conditions.json"
    db.write_text(json.dumps(DB))
    _, opts = resolve(_request(tmp_path, anatomy_size_db=str(db)))
    assert opts["anatomy"] == [0.6, 0.45, 0.7, 0.8, 0.9, -1, -1, 0.05, -1, -1]  # |0.5-0.45| < |0.2-0.45|
    assert opts["anatomy_size_db"]["path"] == str(db) and len(opts["anatomy_size_db"]["sha256"]) == 64
    (tmp_path / "models").mkdir()  # NVIDIA's layout: models/ beside datasets/, found through --weights
    _, opts = resolve(_request(tmp_path, weights=str(tmp_path / "models")))
    assert opts["anatomy"][0] == 0.6 and opts["anatomy_size_db"]["path"] == str(db)
    assert "stay -1" not in capsys.readouterr().err


def test_without_the_database_unset_sizes_stay_minus_one_and_say_so(tmp_path, capsys):
    from fastmaisi.pipelines.generate import generate, resolve

    _, opts = resolve(_request(tmp_path, weights=str(tmp_path)))
    assert opts["anatomy"] == [-1, 0.45, -1, -1, -1, -1, -1, -1, -1, -1] and opts["anatomy_size_db"] is None
    assert capsys.readouterr().err == ""  # said once the run is known to go ahead
    generate(_request(tmp_path), progress=False, dry_run=True)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "stay -1" in err[0]


def test_bad_anatomy_size_db_is_one_line_exit_2(tmp_path, capsys):
    from fastmaisi.pipelines.generate_cli import generate_main

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    for path in (tmp_path / "missing.json", bad):
        code = generate_main(["-o", str(tmp_path / "out"), "--variant", "rflow-ct", "--organ-size", "liver=0.4",
                              "--anatomy-size-db", str(path), "--dry-run", "-q"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "anatomy-size" in err
    assert not (tmp_path / "out").exists()


def test_blanking_outside_the_body_equals_cropping_the_mapped_image():
    """Outside every label the reference writes air (CT -1000 HU) / 0 (MR) into the mapped image; we blank the decoder
    output first (unit 0), which must give the same voxels."""
    import torch

    from fastmaisi.io import hu_from_unit
    from fastmaisi.pipelines.from_mask import blank_outside_body

    g = torch.Generator().manual_seed(0)
    unit = torch.rand(9, 8, 7, generator=g) * 1.2 - 0.1
    label = np.random.default_rng(0).integers(0, 3, (9, 8, 7)).astype(np.int16)
    for modality, background in (("ct", -1000), ("mr", 0)):
        cropped = hu_from_unit(unit, modality).copy()
        cropped[label == 0] = background
        assert np.array_equal(hu_from_unit(blank_outside_body(unit, label), modality), cropped)
        assert np.array_equal(hu_from_unit(blank_outside_body(unit, torch.from_numpy(label)), modality), cropped)
