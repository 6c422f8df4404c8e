"""`fastmaisi.nets.build`: bad definitions give clear errors."""

import pytest

from fastmaisi.nets import build, network_class


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown network _target_ 'monai.networks.nets.UNet'"):
        build({"_target_": "monai.networks.nets.UNet", "spatial_dims": 3})


def test_missing_target():
    with pytest.raises(ValueError, match="_target_"):
        build({"spatial_dims": 3})


def test_unresolved_reference():
    with pytest.raises(ValueError, match="unresolved config references"):
        build({"_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
               "spatial_dims": "@spatial_dims"})


def test_registry_names_monai_classes():
    for name in ("AutoencoderKlMaisi", "DiffusionModelUNetMaisi", "DiffusionModelUNet", "ControlNetMaisi"):
        try:
            cls = network_class("monai.x." + name)
        except ModuleNotFoundError:
            pytest.skip("network module not built yet")
        assert cls.__name__ == name
