"""Block-wise gradient checkpointing for MONAI's ``DiffusionModelUNet`` (shared by both UNets)."""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def checkpointed_forward(unet: DiffusionModelUNet, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
    """``unet(x, timesteps=t, context=context)`` with every down/middle/up block recomputed in
    backward instead of storing its activations (no extra residuals or class labels).

    Mirrors ``DiffusionModelUNet.forward`` block by block, so outputs and gradients equal the
    plain forward (tested); only activation memory changes.
    """
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    emb = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0]).to(dtype=x.dtype))
    h = unet.conv_in(x)
    skips = [h]
    for block in unet.down_blocks:
        h, res = checkpoint(block, h, emb, context, use_reentrant=False)
        skips.extend(res)
    h = checkpoint(unet.middle_block, h, emb, context, use_reentrant=False)
    for block in unet.up_blocks:
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        h = checkpoint(block, h, res, emb, context, use_reentrant=False)
    return unet.out(h)
