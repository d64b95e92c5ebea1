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
            # h and c have no sample axis: the spec declares them so (`inputs: {h: {sample_axis: null}}`)
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


# --- silero-vad's stateful graph (data/silero_vad.onnx): one 32 ms chunk per sample, the state beside it ---
#
# That graph is what the package runs (`load_silero_vad(onnx=True)`): input [N, 576] (64 samples of
# context + 512 new), state [2, N, 128] with the N streams on axis 1, sr a scalar. Deployed, the state
# is carried from chunk to chunk. Here each chunk is a sample of its own, with the state FP32 had when
# it reached that chunk (teacher forcing), so the samples are independent and every model sees the same
# inputs; the spec declares `state: {sample_axis: 1}` and `sr: {value: 16000}`. A variant's error does
# not build up through its own state this way: the guards on the `stateN` output show how far the
# state itself moves.
STATEFUL_STATE = (2, 1, 128)
SAMPLE_RATE = 16000


@cache
def _stateful_session():
    import onnxruntime as ort
    import silero_vad

    model = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _stateful_chunks(name: str) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    session, rate = _stateful_session(), np.array(SAMPLE_RATE, np.int64)
    batches = []
    for clip, clip_labels in zip(*_split(name), strict=True):
        rows, state, states = model_rows(clip), np.zeros(STATEFUL_STATE, np.float32), []
        for row in rows:
            states.append(state)
            _, state = session.run(None, {"input": row[None], "state": state, "sr": rate})
        batches.append(({"input": rows, "state": np.concatenate(states, axis=1)}, clip_labels.astype(np.int64)))
    return batches


def stateful_evaluation_chunks() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return _stateful_chunks("evaluation")


def stateful_calibration_chunks() -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    return _stateful_chunks("calibration")
