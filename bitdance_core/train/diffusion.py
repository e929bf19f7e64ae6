"""The autoregressive side of the recipe, shared by both trainers (upstream diff_head_parallel.py,
model_parallel.py): the diffusion-head loss, the bit-flip perturbation of the inputs, label dropout,
and the upstream initialisation of the engine's HeadNet.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.head import HeadNet


def flow_loss(net: HeadNet, target: torch.Tensor, cond: torch.Tensor, p_mean: float, p_std: float,
              time_shift: float = 1.0) -> torch.Tensor:
    """Flow matching with an x-predicting head, scored on velocity.

    t ~ sigmoid(N(p_mean, p_std)) (logit-normal), z = (1 - t) noise + t x; the head predicts x from
    (z, t, cond); both the true and the predicted x become velocities (x - z) / max(1 - t, 0.05)."""
    n = target.shape[0]
    t = torch.sigmoid(torch.randn(n, device=target.device) * p_std + p_mean)
    if time_shift != 1.0:
        t = (1 / time_shift) / ((1 / time_shift) + (1 / t - 1))
    ti = t.view(-1, *([1] * (target.dim() - 1)))
    noise = torch.randn_like(target)
    z = (1 - ti) * noise + ti * target
    scale = (1 - ti).clamp_min(0.05)
    v = (target - z) / scale
    v_pred = (net(z, t, cond) - z) / scale
    return ((v - v_pred) ** 2).mean()


def flip_bits(bits: torch.Tensor, p_max: float) -> torch.Tensor:
    """Flip each ±1 bit with probability p_max * u, u ~ U(0, 1) per bit (upstream's uniform-probability
    flip): the backbone learns to read its own, imperfect, sampled bits."""
    if p_max <= 0:
        return bits
    flip = torch.rand_like(bits) < p_max * torch.rand_like(bits)
    return torch.where(flip, -bits, bits)


def drop_labels(labels: torch.Tensor, null: int, p: float) -> torch.Tensor:
    """Replace labels by the null class with probability p (classifier-free guidance)."""
    drop = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null), labels)


def init_head(net: HeadNet) -> HeadNet:
    """Upstream TransEncoder.initialize_weights: xavier linears, small time MLP, zero adaLN and output."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
    nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
    for m in list(net.ada_ln_blocks) + [net.final_layer.ada_ln_modulation, net.final_layer.linear]:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    return net


def init_linear_embed(module: nn.Module, std: float = 0.02) -> None:
    """Upstream BitDance.__init_weights: N(0, 0.02) linear and embedding weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding) or type(m).__name__ == "Embedding":
            nn.init.normal_(m.weight, std=std)
