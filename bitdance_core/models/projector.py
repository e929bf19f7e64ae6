"""The connector that embeds a block of ±1 bits at the backbone's width (`fc1`, `fc2`)."""
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, bits):
        return self.fc2(F.gelu(self.fc1(bits.to(self.fc1.weight.dtype)), approximate="tanh"))
