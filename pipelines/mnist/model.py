"""Small CNN for 28x28 grayscale digits, built to quantize cleanly to INT8.

Only Conv2d, ReLU, MaxPool2d, Flatten and Linear, which ONNX Runtime's x86
INT8 kernels (QLinearConv / QGemm / MaxPool on uint8) all cover. No BatchNorm.

Input: float32 [N, 1, 28, 28] holding raw pixel values 0..255, so the data
files can stay uint8 and only need a cast. The /255 scaling and the MNIST
mean/std normalisation happen inside forward as one affine step.
Output: logits [N, 10].
"""

import torch
from torch import nn

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class MnistCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32x14x14
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 64x7x7
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 64x3x3
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std, folded into one multiply and one subtract.
        x = images * (1.0 / (255.0 * MNIST_STD)) - (MNIST_MEAN / MNIST_STD)
        return self.classifier(self.features(x))


def build_model() -> nn.Module:
    """Return an untrained MnistCNN (load checkpoint.pt into it)."""
    return MnistCNN()
