"""A tiny network config in the official `config_network_*.json` layout: MAISI's classes with a few channels.

For CPU tests and smoke runs (tests, `bench/bench_multi_gpu.py --tiny`): every workflow runs in seconds, and the file
loads like the official one (`--network-config`, `config.resolve_network_definition`).
"""

_AE = dict(_target_="monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi", spatial_dims=3,
           in_channels=1, out_channels=1, latent_channels=4, num_channels=[8, 8, 16], num_res_blocks=[1, 1, 1],
           norm_num_groups=4, norm_eps=1e-6, attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
           with_decoder_nonlocal_attn=False, use_checkpointing=False, use_convtranspose=False, norm_float16=True,
           num_splits=4, dim_split=1)
_TRUNK = dict(spatial_dims=3, in_channels=4, num_channels=[8, 16, 16, 32], attention_levels=[False, False, True, True],
              num_head_channels=[0, 0, 8, 8], num_res_blocks=1, norm_num_groups=8, use_flash_attention=True,
              num_class_embeds=128, resblock_updown=True, include_fc=True)
TINY_NETWORK_CONFIG = {
    "spatial_dims": 3, "latent_channels": 4, "mask_generation_latent_shape": [4, 8, 8, 8],
    "autoencoder_def": _AE,
    "diffusion_unet_def": dict(_target_="monai.apps.generation.maisi.networks.diffusion_model_unet_maisi."
                               "DiffusionModelUNetMaisi", out_channels=4, include_spacing_input=True, **_TRUNK),
    "controlnet_def": dict(_target_="monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
                           conditioning_embedding_in_channels=8, conditioning_embedding_num_channels=[8, 8, 8],
                           **_TRUNK),
    "mask_generation_autoencoder_def": _AE | dict(in_channels=8, out_channels=125, use_convtranspose=True),
    "mask_generation_diffusion_def": dict(
        _target_="monai.networks.nets.diffusion_model_unet.DiffusionModelUNet", spatial_dims="@spatial_dims",
        in_channels="@latent_channels", out_channels="@latent_channels", channels=[8, 8, 16, 16],
        attention_levels=[False, False, True, True], num_head_channels=[0, 0, 8, 8], num_res_blocks=1,
        norm_num_groups=8, with_conditioning=True, upcast_attention=True, cross_attention_dim=10),
    "noise_scheduler": {"_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler",
                        "num_train_timesteps": 1000, "use_discrete_timesteps": False, "use_timestep_transform": True,
                        "sample_method": "uniform", "scale": 1.4},
}
