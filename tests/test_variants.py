"""Our variant registry carries the same network definitions as NVIDIA's official config files."""

import json
from pathlib import Path

import pytest

from fastmaisi.variants import MASK_AUTOENCODER_DEF, MASK_DIFFUSION_DEF, fov_warnings, get_variant

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"


def _resolved(cfg: dict, key: str) -> dict:
    return {k: (cfg[v[1:]] if isinstance(v, str) and v.startswith("@") else v) for k, v in cfg[key].items()}


@pytest.mark.parametrize("variant,config", [("rflow-ct", "config_network_rflow.json"),
                                            ("ddpm-ct", "config_network_ddpm.json")])
def test_definitions_equal_official_config(variant, config):
    path = CONFIGS / config
    if not path.exists():
        pytest.skip("shared/reference/configs not beside the checkout")
    cfg = json.loads(path.read_text())
    defs = get_variant(variant).definitions()
    for role, key in [("autoencoder", "autoencoder_def"), ("diffusion_unet", "diffusion_unet_def"),
                      ("controlnet", "controlnet_def")]:
        ours = dict(defs[role])
        official = _resolved(cfg, key)
        if role == "autoencoder":  # tensor-parallel split count differs between the two files; it changes no weights
            ours.pop("num_splits"), official.pop("num_splits")
        assert ours == official, role
    assert MASK_AUTOENCODER_DEF == _resolved(cfg, "mask_generation_autoencoder_def")
    assert MASK_DIFFUSION_DEF == _resolved(cfg, "mask_generation_diffusion_def")


def test_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant 'rflow-xx'; choose from rflow-ct"):
        get_variant("rflow-xx")


def test_fov_warning():
    v = get_variant("rflow-ct")
    assert fov_warnings(v, (512, 512, 512), (1.0, 1.0, 1.0)) == []
    warns = fov_warnings(v, (128, 128, 128), (1.0, 1.0, 1.0))
    assert len(warns) == 2 and "axis 0 is 128 mm" in warns[0]
