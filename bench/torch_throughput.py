#!/usr/bin/env python3
"""PyTorch baseline for the trainer's throughput (issue 9).

The same three architectures as `models/src/arch.rs` (small-cnn, resnet8, mobilenet; GroupNorm with
at most 8 groups, PyTorch's default initialisation), trained the way `train_local` trains them:
UTKFace 64x64 gender, images decoded once into memory and normalised with the loader's ImageNet
mean and std, shuffled batches with random horizontal flips, cross-entropy, AdamW (lr 1e-3, PyTorch
defaults otherwise). Prints images per second for forward, backward and optimiser step together, one
line per model, in the same format as `models/examples/throughput.rs` so that `make bench` can put the
two side by side.

    python bench/torch_throughput.py --data-dir ../shared/data/utkface-64 --images 2048 \
        --steps 30 --batch 64 --archs small-cnn,resnet8,mobilenet --threads 2
"""
import argparse
import os
import random
import sys
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch without numpy: fine here

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def gn(c):
    groups = min(8, c)
    while c % groups:
        groups -= 1
    return nn.GroupNorm(groups, c, eps=1e-5)


class SmallCnn(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 128, 3, padding=1)]
        )
        self.fc1 = nn.Linear(128 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, classes)

    def forward(self, x):
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.gn1 = gn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.gn2 = gn(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, 0), gn(c_out))

    def forward(self, x):
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + skip)


class ResNet8(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), gn(16), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def conv_gn(c_in, c_out, k, stride, groups):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups), gn(c_out), nn.ReLU())


class MobileNet(nn.Module):
    def __init__(self, classes):
        super().__init__()
        layers = [conv_gn(3, 32, 3, 2, 1)]
        for c_in, c_out, stride in [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]:
            layers += [conv_gn(c_in, c_in, 3, stride, c_in), conv_gn(c_in, c_out, 1, 1, 1)]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(256, classes)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


ARCHS = {"small-cnn": SmallCnn, "resnet8": ResNet8, "mobilenet": MobileNet}


def load(data_dir, limit):
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".jpg"))
    images, labels = [], []
    for f in files:
        parts = f.split("_")
        if len(parts) < 4 or parts[1] not in ("0", "1"):
            continue
        img = Image.open(os.path.join(data_dir, f)).convert("RGB").resize((64, 64))
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(64, 64, 3)
        images.append(t.permute(2, 0, 1).float().div(255.0))
        labels.append(int(parts[1]))
        if len(images) == limit:
            break
    x = torch.stack(images)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(labels)


def batches(n, batch, rng):
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def train(model, x, y, steps, batch, rng):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    it = batches(len(x), batch, rng)
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.tensor(next(it))
        xb, yb = x[idx], y[idx]
        flip = torch.rand(len(idx), generator=None) < 0.5
        xb[flip] = xb[flip].flip(3)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return time.perf_counter() - t0, sum(losses) / len(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_dir = os.path.join(os.environ.get("CADUCEUS_DATA_DIR", "../shared/data"), "utkface-64")
    p.add_argument("--data-dir", default=default_dir)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--archs", default="small-cnn,resnet8,mobilenet")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    t = time.perf_counter()
    x, y = load(a.data_dir, a.images)
    print(f"loaded {len(x)} images in {time.perf_counter() - t:.2f}s; torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name in a.archs.split(","):
        if name not in ARCHS:
            sys.exit(f"unknown model '{name}' (expected one of {', '.join(ARCHS)})")
        model = ARCHS[name](2)
        train(model, x, y, 2, a.batch, rng)  # warm-up, as the Rust side does
        secs, loss = train(model, x, y, a.steps, a.batch, rng)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"{name:10} PyTorch    {params:>9} params  batch {a.batch}  {a.steps} steps  "
            f"{a.steps * a.batch / secs:7.1f} images/s  (loss {loss:.3f})"
        )


if __name__ == "__main__":
    main()
