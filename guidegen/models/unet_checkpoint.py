"""Block-wise forward of MONAI's ``DiffusionModelUNet`` (shared by both UNets).

Two things MONAI's own ``forward`` cannot do, both done here by walking its blocks in the same
order:
- gradient checkpointing: every down/middle/up block recomputed in backward instead of storing
  its activations;
- layer-wise context (knowledge injection, ``text.layerwise_injection``): a context of shape
  ``(B, L, Q, D)`` gives UNet level ``l`` its own tokens ``[:, l]``. Down block ``l`` and the
  up block at the same resolution read level ``l``; the middle block reads the deepest level.
"""

from __future__ import annotations

from monai.networks.nets import DiffusionModelUNet
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def check_context(context: Tensor, batch: int, context_dim: int, levels: int) -> None:
    """``(B, Q, D)`` or layer-wise ``(B, levels, Q, D)``; ValueError naming the expected shape otherwise."""
    ok = context.shape[0] == batch and context.shape[-1] == context_dim and (
        context.ndim == 3 or (context.ndim == 4 and context.shape[1] == levels))
    if not ok:
        raise ValueError(f"context must be (B={batch}, Q, {context_dim}) or layer-wise (B={batch}, {levels}, Q, "
                         f"{context_dim}), got {tuple(context.shape)}")


def unet_forward(unet: DiffusionModelUNet, x: Tensor, t: Tensor, context: Tensor | None,
                 gradient_checkpointing: bool = False) -> Tensor:
    """``unet(x, timesteps=t, context=context)``, optionally checkpointed and/or with layer-wise context.

    ``context``: None, ``(B, Q, D)`` (every block reads it) or ``(B, L, Q, D)`` with L = number of
    levels. Outputs and gradients equal MONAI's forward when every level gets the same tokens
    (tested); checkpointing only changes activation memory.
    """
    layerwise = context is not None and context.ndim == 4
    if not layerwise and not gradient_checkpointing:
        return unet(x, timesteps=t, context=context)
    from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

    levels = len(unet.down_blocks)

    def level_ctx(level: int) -> Tensor | None:
        return context[:, level] if layerwise else context

    def run(block, *args):
        return checkpoint(block, *args, use_reentrant=False) if gradient_checkpointing else block(*args)

    emb = unet.time_embed(get_timestep_embedding(t, unet.block_out_channels[0]).to(dtype=x.dtype))
    h = unet.conv_in(x)
    skips = [h]
    for level, block in enumerate(unet.down_blocks):
        h, res = run(block, h, emb, level_ctx(level))
        skips.extend(res)
    h = run(unet.middle_block, h, emb, level_ctx(levels - 1))
    for j, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        h = run(block, h, res, emb, level_ctx(levels - 1 - j))
    return unet.out(h)
