"""SpectralResCNN: a residual 1-D CNN with a heteroscedastic head.

Input ``(batch, in_channels, n_pixels)``; output ``(mean, log_variance)``, each ``(batch, n_labels)``, in
standardised label units. The network is a strided stem convolution, three groups of residual blocks
(Conv1d - BatchNorm1d - activation - dropout - Conv1d - BatchNorm1d, plus a projected shortcut) whose
first block halves the length while the channels grow, an adaptive average pooling and a two-layer head.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import ModelConfig, register_model


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name."""
    return {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "leaky_relu": lambda: nn.LeakyReLU(0.01),
        "elu": nn.ELU,
    }[name]()


class ResidualBlock(nn.Module):
    """Two convolutions with batch norm, activation and dropout, plus a shortcut.

    Parameters
    ----------
    c_in, c_out : int
        Input and output channels.
    kernel_size : int
        Odd convolution kernel.
    downsample : str or None
        ``None`` keeps the length; ``'stride'``, ``'maxpool'`` or ``'avgpool'`` halve it.
    dropout : float
        Dropout probability between the two convolutions.
    activation : str
        Activation name.
    """

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, downsample: str | None, dropout: float, activation: str
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        stride = 2 if downsample == "stride" else 1
        self.pool: nn.Module = nn.Identity()
        if downsample == "maxpool":
            self.pool = nn.MaxPool1d(2, ceil_mode=True)
        elif downsample == "avgpool":
            self.pool = nn.AvgPool1d(2, ceil_mode=True)
        self.conv1 = nn.Conv1d(c_in, c_out, kernel_size, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.act1 = make_activation(activation)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if c_in != c_out or stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out)
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        out = self.drop(self.act1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class SpectralResCNN(nn.Module):
    """Residual 1-D CNN predicting a mean and a log-variance per label.

    Parameters
    ----------
    config : ModelConfig
        Architecture sizes.
    n_pixels : int
        Length of the input spectra (only checked at run time; the network is length-agnostic).
    n_labels : int
        Number of labels ``L``; the head outputs ``2 L`` numbers.
    """

    def __init__(self, config: ModelConfig, n_pixels: int, n_labels: int) -> None:
        super().__init__()
        self.config = config
        self.n_pixels = int(n_pixels)
        self.n_labels = int(n_labels)
        c = config
        self.stem = nn.Sequential(
            nn.Conv1d(
                c.in_channels,
                c.stem_channels,
                c.stem_kernel_size,
                stride=c.stem_stride,
                padding=c.stem_kernel_size // 2,
                bias=False,
            ),
            nn.BatchNorm1d(c.stem_channels),
            make_activation(c.activation),
        )
        blocks: list[nn.Module] = []
        c_prev = c.stem_channels
        for c_out in c.group_channels:
            for k in range(c.blocks_per_group):
                down = c.downsample if k == 0 else None
                blocks.append(ResidualBlock(c_prev, c_out, c.kernel_size, down, c.dropout, c.activation))
                c_prev = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(c.pool_bins)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_prev * c.pool_bins, c.head_hidden),
            make_activation(c.activation),
            nn.Dropout(c.head_dropout),
            nn.Linear(c.head_hidden, 2 * n_labels),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv1d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Start the residual branches near zero (each block begins close to its shortcut) and the
        # output layer small, so initial predictions sit near the label mean with unit variance.
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.bn2.weight)
        last = self.head[-1]
        assert isinstance(last, nn.Linear)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(mean, log_variance)``, each ``(batch, n_labels)``; the log-variance is clamped."""
        return self.head_forward(self.trunk(x))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: pooled features ``(batch, channels, pool_bins)``."""
        if x.ndim != 3 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (batch, {self.config.in_channels}, pixels), got {tuple(x.shape)}"
            )
        return self.pool(self.blocks(self.stem(x)))

    def head_forward(self, h: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The head on trunk features: ``(mean, log_variance)``. With dropout only in the head (the default
        since the accuracy ablation), MC-Dropout runs the trunk once and samples only this part.

        With ``start > 0``, ``h`` is the output of the first ``start`` modules of ``self.head`` and only the
        remaining ones run (MC-Dropout computes the layers before the dropout once per batch).
        """
        if start:
            out = h
            for layer in list(self.head)[start:]:
                out = layer(out)
        else:
            out = self.head(h)
        out = out.float()
        mean, logvar = out[:, : self.n_labels], out[:, self.n_labels :]
        return mean, logvar.clamp(self.config.logvar_min, self.config.logvar_max)


def _factory(config: ModelConfig, n_pixels: int, n_labels: int) -> nn.Module:
    return SpectralResCNN(config, n_pixels, n_labels)


register_model("rescnn")(_factory)
register_model(
    "rescnn_small",
    stem_channels=8,
    stem_kernel_size=7,
    group_channels=(8, 16, 24),
    kernel_size=5,
    pool_bins=8,
    head_hidden=32,
    dropout=0.0,
    head_dropout=0.0,
)(_factory)
register_model(
    "rescnn_wide",
    stem_channels=48,
    group_channels=(48, 96, 160),
    blocks_per_group=2,
    kernel_size=7,
    pool_bins=16,
    head_hidden=256,
)(_factory)
