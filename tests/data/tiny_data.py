"""Small inputs shared by the latent and REPA tests: an image folder and a tiny random AutoencoderKL."""
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
