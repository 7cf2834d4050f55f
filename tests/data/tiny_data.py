"""Small inputs shared by the latent and REPA tests: an image folder, a tiny random AutoencoderKL, and
stand-ins for an image dataset, a VAE and a patch encoder."""
import numpy as np
import torch
from PIL import Image


def write_image_folder(root, classes=("a", "b"), per_class=3, seed=0):
    """``per_class`` random 24x20 RGB PNGs in one subfolder per class; returns ``root``."""
    rng = np.random.RandomState(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def save_tiny_vae(path):
    """A randomly initialised 2-level AutoencoderKL (16 px in, 4x8x8 latents) saved with save_pretrained."""
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


class TensorImages(torch.utils.data.Dataset):
    """``n`` random [3, size, size] images in [-1, 1] with labels 0, 1, 0, ... (an ImageFolderDataset stand-in)."""

    def __init__(self, n=6, size=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        self.num_classes = 2

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": i % 2}


class PoolVAE:
    """Stand-in VAE: latents are 2x average-pooled images (what extract_latents needs is the interface)."""

    def encode(self, x):
        mean = torch.nn.functional.avg_pool2d(x, 2)
        return type("Out", (), {"latent_dist": type("Dist", (), {"mean": mean, "std": mean.abs() + 0.1})})


class PoolEncoder(torch.nn.Module):
    """A stand-in PatchEncoder: 4x4 average-pooled pixels as 16 tokens of width 3."""
    name, image_size, grid_size, z_dim = "pool", 16, 4, 3
    mean, std, resize_first = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, pixels):
        return torch.nn.functional.avg_pool2d(pixels, 4).flatten(2).transpose(1, 2) * self.w
