"""Tiny PyTorch models for the QAT tests: one per layout ORT fuses differently."""

import torch
from torch import nn


class TinyCnn(nn.Module):
    """Conv+ReLU (QLinearConv), MaxPool between quantized layers, 2-D Linear (QGemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images))


class TinyTokenMlp(nn.Module):
    """Linear layers on [batch, tokens, features] (MatMul + Add: QLinearMatMul), then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(tokens))).mean(dim=1)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCnn()


def tiny_token_mlp() -> nn.Module:
    torch.manual_seed(0)
    return TinyTokenMlp()
