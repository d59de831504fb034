"""Models for the experiment tasks, each built with its parent norm (the A arm).

Every model uses plain torch norm layers (or a ``transformers`` model's own), so that
every arm is the same model passed through a converter (``convert_norms``,
``convert_to_normalnorm``, ``convert_to_dyt``) with identical initial weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MNIST1DCNN(nn.Module):
    """The MNIST-1D convolutional baseline (3 strided Conv1d + linear; published 94% test
    accuracy) with BatchNorm after each convolution."""

    def __init__(self, length: int = 40, channels: int = 25, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 1
        for kernel in (5, 3, 3):
            layers += [nn.Conv1d(in_channels, channels, kernel, stride=2, padding=1), nn.BatchNorm1d(channels), nn.ReLU()]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            flat = self.features(torch.zeros(2, 1, length)).numel() // 2
        self.head = nn.Linear(flat, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class MNIST1DMLP(nn.Module):
    """Two hidden layers of 100 units with LayerNorm before each ReLU (published MLP: 68%)."""

    def __init__(self, length: int = 40, hidden: int = 100, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(length, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.act1 = nn.ReLU()  # modules, not torch.relu, so activation capture can hook them
        self.act2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet for 28×28 grey images: a 3×3 stem and three stages of basic
    blocks (widths ``widths``), BatchNorm throughout, global average pooling."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), blocks: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, in_channels = [], widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(in_channels, width, 2 if (i > 0 and b == 0) else 1))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))


class PreNormBlock(nn.Module):
    """x + attn(LN(x)), then x + mlp(LN(x)). Written out (rather than
    ``nn.TransformerEncoderLayer``) because torch's encoder-layer fast path reads the
    LayerNorm weights directly in eval and would bypass a converted norm."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """A ViT for 28×28 grey images: 7×7 patches of 4×4 pixels, a class token, learned
    position embeddings, pre-norm blocks with LayerNorm, and a final LayerNorm."""

    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patchify = nn.Conv2d(1, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(PreNormBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patchify(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


def gpt2_char_model(vocab_size: int, block_size: int, dim: int = 128, layers: int = 4, heads: int = 4) -> nn.Module:
    """A character-level GPT-2 (LayerNorm parent) from a ``transformers`` config; no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=dim,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def llama_char_model(vocab_size: int, block_size: int, dim: int = 128, layers: int = 4, heads: int = 4) -> nn.Module:
    """A character-level LLaMA (RMSNorm parent) from a ``transformers`` config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=int(dim * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block_size,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)
