"""Make the text-line data for rapidocr's PP-OCRv4 recognizer: rendered lines of known text, unpadded.

The recognizer (`ch_PP-OCRv4_rec_infer.onnx` in the `rapidocr-onnxruntime` wheel) reads one text line
as `x` [N, 3, 48, W]: the line scaled to 48 pixels high at its own aspect ratio, so W (and the output's
time axis T = W / 8) differs from line to line. The package pads each line to W >= 320; this data does
not, which gives exactly the package's text (checked on every line when this was written) and is what
int8flow must handle: samples of different shapes. One `.npz` per line, in `lines-evaluation/` (80 lines)
and `lines-calibration/` (24 lines): `x` float16 [1, 3, 48, W] normalised as the package does
((pixel / 255 - 0.5) / 0.5; float16 holds it to 1e-3, and the FP32 results are measured on these
values), `labels` int32 [1, L]: the line's characters as indices of the model's output classes (blank
= 0, the model's `character` metadata, then space), so a metric compares them with the CTC decoding of
the output without a character table.

Text: seeded words, codes and amounts (no external source); rendering: Pillow's built-in scalable font,
which every Pillow has. Run once and commit the output; CI only reads the files:

    .venv/bin/python pipelines/ocr/make_lines.py

The committed files were made with Pillow 13.0.0 (FreeType in its wheel); another version may move
pixels, never labels.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import onnx
import rapidocr_onnxruntime
from PIL import Image, ImageDraw, ImageFont

MODEL = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_rec_infer.onnx"
HERE = Path(__file__).parent
WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount date order number model quantize runtime "
    "python onnx calibration accuracy latency kernel vector receipt shipping address customer balance"
).split()
ALNUM = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789"
SETS = {"lines-evaluation": (80, 1), "lines-calibration": (24, 2)}  # folder: (lines, seed)


def texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for index in range(count):
        if index % 3 == 0:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))))
        elif index % 3 == 1:
            lines.append("".join(rng.choice(ALNUM) for _ in range(rng.randint(3, 14))))
        else:
            lines.append(f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d} {rng.choice(['EUR', 'USD', 'kg', 'km'])}")
    return lines


def render(text: str, size: int = 32, pad: int = 6) -> Image.Image:
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (int(right - left) + 2 * pad, int(bottom - top) + 2 * pad), "white")
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill="black", font=font)
    return image


def to_input(image: Image.Image, height: int = 48) -> np.ndarray:
    """rapidocr's resize_norm_img without its pad to 320: [1, 3, 48, W], BGR, in [-1, 1]."""
    width, original_height = image.size
    resized = image.resize((max(8, math.ceil(height * width / original_height)), height), Image.BILINEAR)
    pixels = np.asarray(resized, np.float32)[:, :, ::-1]
    return (((pixels.transpose(2, 0, 1) / 255.0) - 0.5) / 0.5)[None]


def classes() -> dict[str, int]:
    """Character -> output class, as rapidocr's CTCLabelDecode: blank, the model's characters, space."""
    metadata = {prop.key: prop.value for prop in onnx.load(str(MODEL), load_external_data=False).metadata_props}
    characters = ["blank", *metadata["character"].splitlines(), " "]
    return {character: index for index, character in enumerate(characters) if index}


def main() -> None:
    index_of = classes()
    for folder, (count, seed) in SETS.items():
        out = HERE / folder
        out.mkdir(exist_ok=True)
        for old in out.glob("*.npz"):
            old.unlink()
        for number, text in enumerate(texts(count, seed)):
            labels = np.asarray([[index_of[character] for character in text]], np.int32)
            x = to_input(render(text)).astype(np.float16)
            np.savez_compressed(out / f"line-{number:03d}.npz", x=x, labels=labels)
        print(f"{out}: {count} lines")


if __name__ == "__main__":
    main()
