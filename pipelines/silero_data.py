"""Labelled speech clips for silero-vad's batched ("sequence") 16 kHz ONNX model.

The clips in silero/speech.npz are espeak-ng sentences between silence and low-level noise, with
per-frame speech labels taken from the synthesis (see silero/make_speech.py, which made the file).
Each clip is one batch: the model's "sequence" axis is its frame axis, so one run over a clip is the
whole recurrent pass, starting from zero LSTM state as the package does.

Frames are cut exactly as silero_vad.sequence_vad.frame_blocks does: each row is 512 new samples
prefixed by the last 64 samples of the previous frame (zeros before the first frame). On these
clips that gives exactly the probabilities of the package's frame-by-frame OnnxWrapper
(silero_vad.onnx), and its TorchScript model's to within 2e-4.
"""

from functools import cache
from pathlib import Path

import numpy as np

SPEECH_FILE = Path(__file__).resolve().parent / "silero" / "speech.npz"
FRAME_SAMPLES, CONTEXT_SAMPLES = 512, 64
STATE_SHAPE = (1, 1, 128)
THRESHOLD = 0.5  # silero-vad's default speech threshold


@cache
def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(SPEECH_FILE, allow_pickle=False) as archive:
        return archive[f"{name}_audio"], archive[f"{name}_labels"]


def model_rows(audio: np.ndarray) -> np.ndarray:
    """int16 16 kHz audio -> float32 [frames, 576] model input; a partial last frame is zero-padded."""
    samples = audio.astype(np.float32) / 32768
    frame_count = -(-len(samples) // FRAME_SAMPLES)
    frames = np.zeros((frame_count, FRAME_SAMPLES), np.float32)
    frames.reshape(-1)[: len(samples)] = samples
    context = np.zeros((frame_count, CONTEXT_SAMPLES), np.float32)
    context[1:] = frames[:-1, -CONTEXT_SAMPLES:]
    return np.concatenate([context, frames], axis=1)


def _clips(name: str) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    audio, labels = _split(name)
    return [
        (
            # "input" first: the pipeline takes the batch size (here, frames) from the first input.
            {"input": model_rows(clip), "h": np.zeros(STATE_SHAPE, np.float32), "c": np.zeros(STATE_SHAPE, np.float32)},
            clip_labels.astype(np.int64),
        )
        for clip, clip_labels in zip(audio, labels, strict=True)
    ]


def evaluation_clips() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return _clips("evaluation")


def calibration_clips() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return _clips("calibration")


def frame_accuracy(outputs: list[np.ndarray], reference_outputs: list[np.ndarray], labels: np.ndarray) -> float:
    """Share of frames where (speech_probs >= 0.5) matches the label. `outputs` holds one array per
    clip; `labels` are all clips' frame labels concatenated. The FP32 outputs are not needed."""
    predicted = np.concatenate([np.asarray(clip).reshape(-1) for clip in outputs]) >= THRESHOLD
    labels = np.asarray(labels).reshape(-1)
    if len(predicted) != len(labels):
        raise ValueError(f"{len(predicted)} frame probabilities for {len(labels)} labels")
    return float(np.mean(predicted == labels.astype(bool)))
