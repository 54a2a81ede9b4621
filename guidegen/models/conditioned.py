"""A denoising UNet behind the knowledge-injection module: the trainable network of a stage.

Both diffusion stages read the same condition (DESIGN §5): text tokens + findings vector →
:class:`~guidegen.text.knowledge.KnowledgeInjection` → context tokens ``(B, Q, C)`` that the
UNet cross-attends to. Keeping the two in one module means one state dict, one EMA and one DDP
wrapper per stage.
"""

from __future__ import annotations

from torch import Tensor, nn

from guidegen.text.knowledge import KnowledgeInjection


class ConditionedDenoiser(nn.Module):
    """``net(x, t, context)`` with ``context = injector(tokens, mask, findings_vec, drop)``.

    Args:
        injector: the knowledge-injection module (its ``null`` is the CFG null condition).
        net: a denoiser ``(x (B, C, X, Y, Z), t (B,), context (B, Q, D)) -> (B, C', X, Y, Z)``.
    """

    def __init__(self, injector: KnowledgeInjection, net: nn.Module) -> None:
        super().__init__()
        self.injector = injector
        self.net = net

    def context(self, tokens: Tensor, mask: Tensor, findings_vec: Tensor, drop: Tensor | None = None) -> Tensor:
        """Context tokens ``(B, Q, C)``; rows with ``drop`` True get the learned null context."""
        return self.injector(tokens, mask, findings_vec, drop)

    def null_context(self, batch_size: int) -> Tensor:
        return self.injector.null_context(batch_size)

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, mask: Tensor, findings_vec: Tensor, drop: Tensor | None = None) -> Tensor:
        return self.net(x, t, self.context(tokens, mask, findings_vec, drop))
