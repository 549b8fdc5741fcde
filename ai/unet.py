"""A compact U-Net for lung-field segmentation (Ronneberger et al. 2015), four down and four up levels.

Batch norm after every convolution and a configurable base width: the default 12 at 256 x 256 runs in a few tens of
milliseconds on two CPU cores, which keeps segmentation a small part of the per-image budget.
"""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Input (N, 1, H, W) with H and W divisible by 16; output (N, 1, H, W) logits of lung-field probability."""

    def __init__(self, base_width: int = 12, depth: int = 4, in_channels: int = 1, out_channels: int = 1) -> None:
        super().__init__()
        self.base_width = base_width
        self.depth = depth
        widths = [base_width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_double_conv(in_channels, widths[0])])
        self.down.extend(_double_conv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up = nn.ModuleList(_double_conv(widths[i] * 2, widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def fuse_for_inference(self) -> UNet:
        """Fold every batch norm into the convolution before it (eval mode only; the same function up to float
        rounding): fewer passes over the feature maps at inference. Returns self."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        if self.training:
            raise RuntimeError("fuse_for_inference needs eval mode (batch norm running statistics)")
        for block in [*self.down, *self.up]:
            for conv_at in (0, 3):
                conv, bn = block[conv_at], block[conv_at + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    block[conv_at], block[conv_at + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upsample, block in zip(self.upsample, self.up, strict=True):
            x = block(torch.cat([upsample(x), skips.pop()], dim=1))
        return self.head(x)
