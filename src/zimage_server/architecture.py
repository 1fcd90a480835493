"""The Z-Image architecture as configs: the full-size models and the tiny test ones, and a builder.

The full-size configs are the released Z-Image-Turbo/Base ones (../shared/REFERENCE.md): the
Qwen3-4B text encoder, the 6.15B single-stream transformer, the FLUX-style VAE. With random
weights they let the GPU benchmark measure speed and the memory simulation measure memory
without downloading anything. Importing this module does not import torch.
"""

from __future__ import annotations

from .testing import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE

FULL_SIZE = {
    "transformer": dict(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[32, 48, 48],
        axes_lens=[1536, 512, 512],
    ),
    "text_encoder": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}
# The tiny test pipeline's shapes (testing.py), for smoke runs on a CPU.
TINY = {"transformer": TINY_TRANSFORMER, "text_encoder": TINY_TEXT_ENCODER, "vae": TINY_VAE}


def build_scheduler():
    """Z-Image's scheduler, the same at every size: flow matching with shift 3, no dynamic shifting.
    Built outside `build_models`' context, so its tables stay float32 on the CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)


def build_models(config: dict, tokenizer) -> dict:
    """The text encoder, transformer and VAE of `config` with random weights, created wherever the
    caller's context says (a torch.device, a default dtype, a FakeTensorMode)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    # A full-size config keeps its 151936-token embedding table; every id of a small tokenizer is valid in it.
    text_config = {"vocab_size": len(tokenizer)} | config["text_encoder"]
    models = {
        "text_encoder": Qwen3Model(Qwen3Config(**text_config, pad_token_id=tokenizer.pad_token_id)),
        "transformer": ZImageTransformer2DModel(**config["transformer"]),
        "vae": AutoencoderKL(**config["vae"]),
    }
    # Older diffusers create the pad tokens with torch.empty; fixed values keep random models deterministic.
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
            token = getattr(models["transformer"], name, None)
            if token is not None:
                token.fill_(1.0)
    return models
