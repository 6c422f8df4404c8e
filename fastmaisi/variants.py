"""The four MAISI product variants and the built-in demo: network definitions, schedulers, weight file names and
sampling defaults.

Torch-free: the CLI answers `--help` and validates from here before importing torch. Network definitions are the
constructor keyword arguments of the MONAI classes (the `*_def` entries of NVIDIA's `config_network_*.json`, with the
`@` references resolved); a user's own config file overrides them via `--network-config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

_AE = "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi"
_UNET = "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi"
_CNET = "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi"
_MASK_UNET = "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet"
_RFLOW = "monai.networks.schedulers.rectified_flow.RFlowScheduler"
_DDPM = "monai.networks.schedulers.ddpm.DDPMScheduler"


def image_autoencoder_def(num_splits: int = 4) -> dict:
    return dict(_target_=_AE, spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4,
                num_channels=[64, 128, 256], num_res_blocks=[2, 2, 2], norm_num_groups=32, norm_eps=1e-6,
                attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False,
                norm_float16=True, num_splits=num_splits, dim_split=1)


def _trunk(body_region: bool) -> dict:
    """Keyword arguments shared by the image UNet and its ControlNet (rflow: modality input; ddpm: body region)."""
    common = dict(spatial_dims=3, in_channels=4, num_channels=[64, 128, 256, 512],
                  attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
                  use_flash_attention=True)
    if body_region:
        return common | dict(include_fc=False, resblock_updown=False)
    return common | dict(num_class_embeds=128, resblock_updown=True, include_fc=True)


def diffusion_unet_def(body_region: bool) -> dict:
    extra = dict(include_top_region_index_input=body_region, include_bottom_region_index_input=body_region,
                 include_spacing_input=True)
    return dict(_target_=_UNET, out_channels=4, **_trunk(body_region), **extra)


def controlnet_def(body_region: bool) -> dict:
    return dict(_target_=_CNET, conditioning_embedding_in_channels=8,
                conditioning_embedding_num_channels=[8, 32, 64], **_trunk(body_region))


MASK_AUTOENCODER_DEF = dict(
    _target_=_AE, spatial_dims=3, in_channels=8, out_channels=125, latent_channels=4, num_channels=[32, 64, 128],
    num_res_blocks=[1, 2, 2], norm_num_groups=32, norm_eps=1e-6, attention_levels=[False, False, False],
    with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_flash_attention=False,
    use_checkpointing=True, use_convtranspose=True, norm_float16=True, num_splits=8, dim_split=1)
MASK_DIFFUSION_DEF = dict(
    _target_=_MASK_UNET, spatial_dims=3, in_channels=4, out_channels=4, channels=[64, 128, 256, 512],
    attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32], num_res_blocks=2,
    use_flash_attention=True, with_conditioning=True, upcast_attention=True, cross_attention_dim=10)
# NVIDIA's v2 mask generator (`rflow-mask`, config_network_rflow.json since 2026-10): the MAISI UNet with adaptive
# GroupNorm, conditioned on 19 numbers (`fastmaisi.mask_conditions`), 100 rectified-flow steps with guidance 2.0
MASK_DIFFUSION_V2_DEF = dict(
    _target_="scripts.adagn_unet.DiffusionModelUNetMaisiAdaGN", spatial_dims=3, in_channels=4, out_channels=4,
    num_channels=[64, 128, 256, 512], attention_levels=[False, False, True, True], num_head_channels=[0, 0, 32, 32],
    num_res_blocks=2, use_flash_attention=True, with_conditioning=True, upcast_attention=True, include_fc=True,
    cross_attention_dim=19, include_spacing_input=True, include_top_region_index_input=False,
    include_bottom_region_index_input=False, adagn_condition_dim=19, adagn_context_embed_dim=256)
MASK_V2_FILE = "mask_generation_diffusion_unet_v2"  # its official file stem
MASK_GENERATORS = ("v1", "v2")
RFLOW_SCHEDULER_DEF = dict(_target_=_RFLOW, num_train_timesteps=1000, use_discrete_timesteps=False,
                           use_timestep_transform=True, sample_method="uniform", scale=1.4)
DDPM_SCHEDULER_DEF = dict(_target_=_DDPM, num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195,
                          schedule="scaled_linear_beta", clip_sample=False)
# the mask DM with fewer than 1000 steps: DDIM (sampled at η = 1, see paired.sample_mask_latent) on the same noise
# schedule (MONAI's DDPM step is t -> t-1)
DDIM_SCHEDULER_DEF = dict(DDPM_SCHEDULER_DEF, _target_="monai.networks.schedulers.ddim.DDIMScheduler")
MASK_LATENT_SHAPE = (4, 64, 64, 64)
# network role -> its `*_def` key in the official config_network_*.json
ROLE_CONFIG_KEYS = {"autoencoder": "autoencoder_def", "diffusion_unet": "diffusion_unet_def",
                    "controlnet": "controlnet_def", "mask_autoencoder": "mask_generation_autoencoder_def",
                    "mask_diffusion": "mask_generation_diffusion_def"}  # the mask DM always works at 256^3 x 1.5 mm


@dataclass(frozen=True)
class Variant:
    """One MAISI product variant and its reference defaults (NV-Generate-CTMR docs/inference.md and configs)."""

    name: str
    modality: str  # "ct" or "mr"
    body_region: bool  # ddpm-ct: top/bottom region inputs instead of a modality class
    scheduler: dict
    steps: int
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    modality_code: int
    guidance_scale: float
    files: dict = field(default_factory=dict)  # role -> official file stem (".pt" or converted ".safetensors")
    mask_steps: int = 1000  # mask DM steps of the paired workflow (the reference: DDPM, 1000)
    mask_latent_shape: tuple = MASK_LATENT_SHAPE
    mask_spacing: tuple = (1.5, 1.5, 1.5)  # mm per voxel of the decoded mask (reference: 256^3 at 1.5 mm)
    default_organ_sizes: dict | None = None  # set: with no --mask / --organ-size, run the paired workflow with these
    mask_generator: str = "v1"  # "v2": the mask_diffusion role is NVIDIA's AdaGN rflow-mask net (`with_mask_generator`)

    @property
    def has_controlnet(self) -> bool:
        return "controlnet" in self.files

    def definitions(self) -> dict:
        """Network definitions by role, as the official config's `*_def` entries."""
        defs = {"autoencoder": image_autoencoder_def(), "diffusion_unet": diffusion_unet_def(self.body_region)}
        if self.has_controlnet:
            defs["controlnet"] = controlnet_def(self.body_region)
        if "mask_autoencoder" in self.files:
            defs["mask_autoencoder"] = dict(MASK_AUTOENCODER_DEF)
            defs["mask_diffusion"] = dict(MASK_DIFFUSION_V2_DEF if self.mask_generator == "v2" else MASK_DIFFUSION_DEF)
        return defs

    def with_mask_generator(self, generator: str) -> "Variant":
        """This variant with the v1 (DDPM, 10 organ sizes) or v2 (rflow-mask, 19 numbers) mask generator."""
        from dataclasses import replace

        if generator not in MASK_GENERATORS:
            raise ValueError(f"--mask-generator {generator!r}: choose v1 or v2")
        if generator == self.mask_generator or "mask_diffusion" not in self.files:
            return self
        if self.mask_generator == "v2":
            raise ValueError(f"variant {self.name} is already set to the v2 mask generator")
        return replace(self, mask_generator=generator, files={**self.files, "mask_diffusion": self.v2_mask_file})

    @property
    def v2_mask_file(self) -> str:
        """The file stem of the v2 mask generator's weights."""
        return MASK_V2_FILE


_CT_MASK_FILES = {"mask_autoencoder": "mask_generation_autoencoder", "mask_diffusion": "mask_generation_diffusion_unet"}

VARIANTS = {
    "rflow-ct": Variant("rflow-ct", "ct", False, RFLOW_SCHEDULER_DEF, 30, (256, 256, 128), (1.7, 1.7, 2.0), 1, 0.0,
                        {"autoencoder": "autoencoder_v1", "diffusion_unet": "diff_unet_3d_rflow-ct",
                         "controlnet": "controlnet_3d_rflow-ct", **_CT_MASK_FILES}),
    "ddpm-ct": Variant("ddpm-ct", "ct", True, DDPM_SCHEDULER_DEF, 1000, (256, 256, 128), (1.0, 1.0, 0.75), 1, 0.0,
                       {"autoencoder": "autoencoder_v1", "diffusion_unet": "diff_unet_3d_ddpm-ct",
                        "controlnet": "controlnet_3d_ddpm-ct", **_CT_MASK_FILES}),
    "rflow-mr": Variant("rflow-mr", "mr", False, RFLOW_SCHEDULER_DEF, 30, (128, 256, 256), (1.25, 1.0, 1.0), 9, 15.0,
                        {"autoencoder": "autoencoder_v2", "diffusion_unet": "diff_unet_3d_rflow-mr"}),
    "rflow-mr-brain": Variant("rflow-mr-brain", "mr", False, RFLOW_SCHEDULER_DEF, 30, (256, 256, 128),
                              (0.94, 0.94, 1.36), 9, 2.0,
                              {"autoencoder": "autoencoder_v1", "diffusion_unet": "diff_unet_3d_rflow-mr-brain_v1"}),
}

# Field of view (mm) the CT variants were trained on: per axis, the range covered by the recommended
# size x spacing pairs in NV-Generate-CTMR docs/inference.md (xy 256..700 mm, z 128..1800 mm). Outside it: a warning.
CT_FOV_MM = ((250.0, 700.0), (250.0, 700.0), (120.0, 1800.0))
MR_FOV_MM = ((100.0, 400.0), (100.0, 400.0), (60.0, 400.0))


# ------------------------------------------------------------------------------------------ the built-in demo
# Narrow networks trained by `scripts/train_demo.py` on the procedural phantoms (`fastmaisi.phantom`), shipped in
# `fastmaisi/data/demo/`; the helpers that run them are in `fastmaisi.demo`. Grid 64^3 at 4.5 x 4.5 x 4.0 mm; image
# latent 4 x 16^3; the mask DM works directly on the image grid (mask latent 4 x 16^3, 100 DDPM steps).
DEMO_WEIGHTS_DIR = Path(__file__).parent / "data" / "demo"  # shipped inside the package
DEMO_SIZE = (64, 64, 64)
DEMO_SPACING = (4.5, 4.5, 4.0)
DEMO_STEPS = 30  # rflow steps of the image DM (ControlNet + UNet)
DEMO_MASK_STEPS = 100  # DDPM steps of the mask DM (divides 1000)
DEMO_MASK_LATENT_SHAPE = (4, 16, 16, 16)  # the mask DM's latent: the demo grid / 4
DEMO_MASK_SPACING = DEMO_SPACING  # the mask VAE decodes straight onto the demo grid
DEMO_FILES = {"autoencoder": "demo_autoencoder", "diffusion_unet": "demo_diffusion_unet",
              "controlnet": "demo_controlnet", "mask_autoencoder": "demo_mask_autoencoder",
              "mask_diffusion": "demo_mask_diffusion_unet"}
DEMO_ORGAN_SIZES = {"gallbladder": 0.0025, "liver": 0.106, "stomach": 0.0164, "pancreas": 0.0053, "colon": 0.0268}
"""Default organ sizes of the paired workflow: the training phantoms' medians (organ voxels / labelled voxels,
`train.data.organ_size_vector`); tumour slots -1 (absent)."""


def _demo_ae(in_channels: int, out_channels: int, channels, res_blocks, transposed: bool) -> dict:
    return dict(_target_=_AE, spatial_dims=3, in_channels=in_channels, out_channels=out_channels, latent_channels=4,
                num_channels=list(channels), num_res_blocks=list(res_blocks), norm_num_groups=8, norm_eps=1e-6,
                attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=transposed,
                norm_float16=False, num_splits=1, dim_split=1)


def _demo_trunk() -> dict:
    """Keyword arguments shared by the demo image UNet and its ControlNet (the rflow-ct trunk, narrow)."""
    return dict(spatial_dims=3, in_channels=4, num_channels=[16, 32, 32, 48],
                attention_levels=[False, False, True, True], num_head_channels=[0, 0, 16, 16], num_res_blocks=1,
                norm_num_groups=8, use_flash_attention=True, num_class_embeds=128, resblock_updown=True,
                include_fc=True)


def demo_definitions() -> dict:
    """Network definitions of the demo, by role (the official `*_def` layout)."""
    return {
        "autoencoder": _demo_ae(1, 1, (16, 32, 32), (1, 1, 1), False),
        "diffusion_unet": dict(_target_=_UNET, out_channels=4, **_demo_trunk(),
                               include_top_region_index_input=False, include_bottom_region_index_input=False,
                               include_spacing_input=True),
        "controlnet": dict(_target_=_CNET, conditioning_embedding_in_channels=8,
                           conditioning_embedding_num_channels=[8, 16, 16], **_demo_trunk()),
        "mask_autoencoder": _demo_ae(8, 125, (8, 16, 32), (1, 1, 1), True),
        "mask_diffusion": dict(_target_=_MASK_UNET, spatial_dims=3, in_channels=4, out_channels=4,
                               channels=[16, 32, 32, 48], attention_levels=[False, False, True, True],
                               num_head_channels=[0, 0, 16, 16], num_res_blocks=1, norm_num_groups=8,
                               use_flash_attention=True, with_conditioning=True, upcast_attention=True,
                               cross_attention_dim=10),
    }


DEMO_MASK_V2_FILE = "demo_mask_diffusion_unet_v2"


def demo_mask_v2_definition() -> dict:
    """The demo's v2 mask generator: NVIDIA's AdaGN UNet narrowed like the demo's v1 mask UNet (19-number condition,
    spacing input), on the 16^3 demo mask latent."""
    return dict(MASK_DIFFUSION_V2_DEF, num_channels=[16, 32, 32, 48], num_head_channels=[0, 0, 16, 16],
                num_res_blocks=1, norm_num_groups=8, adagn_context_embed_dim=64)


@dataclass(frozen=True)
class DemoVariant(Variant):
    """A `Variant` whose networks are the narrow demo definitions; the mask DM works on the image grid."""

    def definitions(self) -> dict:
        defs = {role: d for role, d in demo_definitions().items() if role in self.files}
        if self.mask_generator == "v2":
            defs["mask_diffusion"] = demo_mask_v2_definition()
        return defs

    @property
    def v2_mask_file(self) -> str:
        return DEMO_MASK_V2_FILE


DEMO_VARIANT = DemoVariant("demo", "ct", False, RFLOW_SCHEDULER_DEF, DEMO_STEPS, DEMO_SIZE, DEMO_SPACING, 1, 0.0,
                           dict(DEMO_FILES), mask_steps=DEMO_MASK_STEPS, mask_latent_shape=DEMO_MASK_LATENT_SHAPE,
                           mask_spacing=DEMO_MASK_SPACING, default_organ_sizes=dict(DEMO_ORGAN_SIZES))


def get_variant(name: str) -> Variant:
    """A MAISI variant by name, or "demo": the built-in demo networks (DEMO_VARIANT)."""
    if name == "demo":
        return DEMO_VARIANT
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}, demo")
    return VARIANTS[name]


def fov_warnings(variant: Variant, size, spacing) -> list[str]:
    """Warnings when size x spacing leaves the field of view the variant was trained on (MAISI's #1 quality knob)."""
    ranges = CT_FOV_MM if variant.modality == "ct" else MR_FOV_MM
    out = []
    for axis, (n, s, (lo, hi)) in enumerate(zip(size, spacing, ranges)):
        fov = n * s
        if not lo <= fov <= hi:
            out.append(f"field of view along axis {axis} is {fov:.0f} mm ({n} x {s} mm); {variant.name} was trained "
                       f"on {lo:.0f}-{hi:.0f} mm: expect poor anatomy")
    return out
