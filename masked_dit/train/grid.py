"""Sample grids: fixed noise and labels, one row per class, labelled on the left."""
from __future__ import annotations

import numpy as np
import torch


def grid_labels(num_classes: int, num_per_class: int, classes=None) -> torch.Tensor:
    # An unconditional model (num_classes=0, MaskDiT) ignores labels: one row, labelled 0.
    num_rows = max(num_classes, 1)
    classes = list(range(min(num_rows, 10))) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_rows]
    if bad:
        raise ValueError(f"grid classes {bad} are outside [0, {num_rows - 1}]")
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(num_per_class)


def fixed_noise(shape, seed: int) -> torch.Tensor:
    """The same noise every time (CPU generator, then moved by the caller)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, C, H, W] -> uint8 NHWC (1 channel stays 1; >3 channels keep the first 3)."""
    x = x.detach().float().cpu()
    if x.shape[1] > 3:
        x = x[:, :3]
    # DiT's / SiT's sample_ddp.py byte for byte: clamp(127.5 x + 128, 0, 255), then the cast truncates
    # (= round half up). Rounding (x + 1) * 127.5 to even differs on ties and, by float rounding, elsewhere.
    return torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(images: torch.Tensor, labels: torch.Tensor, path, per_row: int, cell: int = 48,
              class_names=None) -> None:
    """One row per ``per_row`` images; each row labelled with its class (name) on the left."""
    from PIL import Image, ImageDraw

    arr = to_uint8(images)
    n, h, w, c = arr.shape
    rows = (n + per_row - 1) // per_row
    scale = max(1, cell // max(h, w))
    ch, cw = h * scale, w * scale
    margin = max(24, cw // 2)
    canvas = Image.new("RGB", (margin + per_row * (cw + 2), rows * (ch + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, per_row)
        img = arr[i][..., 0] if c == 1 else arr[i]
        tile = Image.fromarray(img).convert("RGB").resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (margin + col * (cw + 2), r * (ch + 2)))
        if col == 0:
            label = int(labels[i])
            text = str(class_names[label]) if class_names else str(label)
            draw.text((4, r * (ch + 2) + ch // 2 - 6), text, fill="black")
    canvas.save(path)
