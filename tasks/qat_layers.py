"""The torch modules of quantization-aware training: a fake-quantized activation and layer.

Imported only when a `kind: qat` variant runs (torch is the optional `[torch]` extra); see `tasks.qat`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PERCENTILE_SAMPLE = 1 << 20  # values per batch a percentile is taken over (torch.quantile's input limit is 2**24)


class ActivationQuantizer(nn.Module):
    """Per-tensor fake quantization of an activation. Three modes: `observe` (record the range,
    pass through), `train` (LSQ: the scale is learned), `export` (fixed Python numbers, so the
    exporter writes constant scale and zero point)."""

    # buffers (`register_buffer`), declared for the type checker
    base_scale: torch.Tensor
    zero_point: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    observed: torch.Tensor

    def __init__(self, qmin: int, qmax: int, symmetric: bool, method: str, percentile: float):
        super().__init__()
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric
        self.method, self.percentile = method, percentile
        # the learned scale is `base_scale * scale_factor`: an optimiser step then moves it by a
        # share of itself, whatever the tensor's magnitude
        self.scale_factor = nn.Parameter(torch.tensor([1.0]))
        self.register_buffer("base_scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0.0]))
        self.register_buffer("low", torch.tensor(0.0))
        self.register_buffer("high", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(0))
        self.mode = "observe"

    def forward(self, x):
        if self.mode == "observe":
            self._observe(x.detach())
            return x
        if self.mode == "export":
            return torch.fake_quantize_per_tensor_affine(
                x, self.current_scale(), int(self.zero_point), self.qmin, self.qmax
            )
        # LSQ's gradient scale keeps the scale's steps in proportion to the tensor it quantizes
        grad_factor = 1.0 / math.sqrt(x.numel() * self.qmax)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.base_scale * self.scale_factor.abs(), self.zero_point, self.qmin, self.qmax, grad_factor
        )

    def current_scale(self) -> float:
        return float(self.base_scale * self.scale_factor.detach().abs())

    def _observe(self, x) -> None:
        if self.method == "percentile":
            flat = x.flatten().float()
            if flat.numel() > PERCENTILE_SAMPLE:
                flat = flat[
                    torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:PERCENTILE_SAMPLE]
                ]
            fraction = self.percentile / 100.0
            low, high = torch.quantile(flat, 1.0 - fraction), torch.quantile(flat, fraction)
            # the mean of per-batch percentiles: one pass, bounded memory
            count = int(self.observed)
            self.low.copy_((self.low * count + low) / (count + 1))
            self.high.copy_((self.high * count + high) / (count + 1))
        else:
            low, high = x.min(), x.max()
            first = int(self.observed) == 0
            self.low.copy_(low if first else torch.minimum(self.low, low))
            self.high.copy_(high if first else torch.maximum(self.high, high))
        self.observed += 1

    def start(self) -> None:
        """Scale and zero point from the observed range (ORT's MinMax rule: the range includes 0)."""
        low, high = min(float(self.low), 0.0), max(float(self.high), 0.0)
        if self.symmetric:
            bound = max(abs(low), abs(high))
            low, high = -bound, bound
        scale = max((high - low) / (self.qmax - self.qmin), 1e-8)
        if self.symmetric:
            zero_point = (self.qmin + self.qmax + 1) // 2
        else:
            zero_point = round(self.qmin - low / scale)
            zero_point = min(max(zero_point, self.qmin), self.qmax)
        with torch.no_grad():
            self.base_scale.fill_(scale)
            self.scale_factor.fill_(1.0)
            self.zero_point.fill_(float(zero_point))
        self.mode = "train"


class QuantizedLayer(nn.Module):
    """A Linear or Conv layer with fake-quantized input, weight and (optionally) output."""

    frozen_weight_scale: torch.Tensor  # a buffer: empty until `freeze`

    def __init__(
        self, layer, make_quantizer, per_channel: bool, weight_max: int, quantize_outputs: bool, fused_relu: bool
    ):
        super().__init__()
        self.layer = layer
        self.input_quantizer = make_quantizer()
        self.output_quantizer = make_quantizer() if quantize_outputs else None
        self.per_channel, self.weight_max, self.fused_relu = per_channel, weight_max, fused_relu
        self.register_buffer("frozen_weight_scale", torch.zeros(0))

    def weight_scale(self):
        weight = self.layer.weight.detach()
        if self.per_channel:
            absmax = weight.abs().amax(dim=tuple(range(1, weight.dim())))
        else:
            absmax = weight.abs().max().reshape(1)
        return (absmax / self.weight_max).clamp(min=1e-12)

    def quantized_weight(self):
        weight = self.layer.weight
        scale = self.frozen_weight_scale if self.frozen_weight_scale.numel() else self.weight_scale()
        # int8 range for the op; `weight_max` (63 with reduce_range) keeps the values inside 7 bits
        if self.per_channel:
            zero = torch.zeros(scale.numel(), dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -128, 127)
        if self.frozen_weight_scale.numel():
            return torch.fake_quantize_per_tensor_affine(weight, float(scale), 0, -128, 127)
        return torch.fake_quantize_per_tensor_affine(weight, scale, torch.zeros(1, dtype=torch.int32), -128, 127)

    def forward(self, x):
        x = self.input_quantizer(x)
        weight = self.quantized_weight()
        layer = self.layer
        if isinstance(layer, nn.Linear) and x.dim() > 2 and self.output_quantizer is not None:
            # exported as MatMul + Add: ORT quantizes the MatMul's output, before the bias
            y = self.output_quantizer(torch.matmul(x, weight.t()))
            y = y + layer.bias if layer.bias is not None else y
            return torch.relu(y) if self.fused_relu else y
        if isinstance(layer, nn.Linear):
            y = torch.nn.functional.linear(x, weight, layer.bias)
        else:
            y = layer._conv_forward(x, weight, layer.bias)
        if self.fused_relu:
            y = torch.relu(y)
        return self.output_quantizer(y) if self.output_quantizer is not None else y
