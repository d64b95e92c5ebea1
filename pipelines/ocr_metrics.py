"""Metrics for the PP-OCRv4 line recognizer (pipelines/ocr-rec-int8.yaml), one text line at a time.

The model's output for a line is [T, 6625]: per time step, probabilities over the blank (class 0), the
characters and space. Greedy CTC decoding (argmax per step, repeats collapsed, blanks dropped), as
rapidocr's CTCLabelDecode does, gives the line's classes; the label is the classes of the rendered text
(pipelines/ocr/make_lines.py). Both metrics are `per_sample: true` user metrics: int8flow calls them with
one line's output, FP32's output for it, and its label, and averages.
"""

from __future__ import annotations

import numpy as np


def decode(output: np.ndarray) -> list[int]:
    best = output.argmax(-1)
    keep = np.ones(len(best), bool)
    keep[1:] = best[1:] != best[:-1]
    return [int(index) for index in best[keep & (best != 0)]]


def exact_match(output: np.ndarray, reference: np.ndarray, label: np.ndarray) -> float:
    """1.0 when the decoded line is exactly the label's text."""
    return float(decode(output) == [int(index) for index in label.reshape(-1)])


def _edit_distance(a: list[int], b: list[int]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


def character_error_rate(output: np.ndarray, reference: np.ndarray, label: np.ndarray) -> float:
    """Edit distance between the decoded line and the label, over the label's length (lower is better)."""
    truth = [int(index) for index in label.reshape(-1)]
    return _edit_distance(decode(output), truth) / max(len(truth), 1)
