"""Bad input at every entry point gives one line ``masked-dit <command>: error: ...`` naming the
offending thing, exit code 2, no traceback, and nothing written over. docs/errors.md lists the
same cases and messages."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from masked_dit.cli import main
from tests.reliability.common import TINY

#################################################################################
#                               Bad-input material                              #
#################################################################################

FOLDER_MODEL = ["--model.in_channels=3", "--model.input_size=16", "--model.num_classes=2"]
LATENT_MODEL = ["--model.in_channels=4", "--model.input_size=4", "--model.patch_size=2", "--model.num_classes=2"]


class PoolVAE:
    """A stand-in VAE: 4x4 average pooling to a 4-channel latent (RGB + their mean)."""

    class _Dist:
        def __init__(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 4)
            self.mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)
            self.std = torch.full_like(self.mean, 0.1)

    def encode(self, x):
        return type("Out", (), {"latent_dist": self._Dist(x)})()


def _images(root, classes=("a", "b"), n=4, size=20, mode="RGB"):
    ext = ".jpg" if mode == "CMYK" else ".png"  # PNG has no CMYK
    rng = np.random.RandomState(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            arr = rng.randint(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).convert(mode).save(root / c / f"{i}{ext}")
    return root


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Good inputs made once: an image folder, extracted latents, a checkpoint and an export."""
    from masked_dit.data import ImageFolderDataset, extract_latents
    from masked_dit.train import train
    from tests.reliability.common import tiny_config

    base = tmp_path_factory.mktemp("material")
    _images(base / "images")
    extract_latents(ImageFolderDataset(str(base / "images"), 16), base / "latents", PoolVAE(), batch_size=4,
                    shard_size=4, progress=False)
    train(tiny_config(base / "runs", **{"train.steps": 1, "train.progress": False}))
    return base


def _tree(root) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            if n == ".lock":  # a run folder's lock: holds the pid of the last training that opened the run
                continue
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


def _sample(work, m, *options):
    """``masked-dit sample`` of the module's DiT run to a grid in ``work``, with ``options``."""
    return ["sample", str(m / "runs/digits-dit"), "--out", str(work / "g.png"), *options]


def _train(work, *extra):
    return ["train", "--preset", "digits-dit", *[f"--{k}={v}" for k, v in TINY.items()],
            f"--run.out_dir={work / 'runs'}", "--train.steps=1", *extra]


#################################################################################
#                                    Cases                                      #
#################################################################################
# Each case: (id, setup(work, material) -> argv, expected message). "{work}" / "{m}" in the message
# stand for the case's work folder and the shared material; a trailing "..." means "starts with".

def _latents_copy(work, m):
    shutil.copytree(m / "latents", work / "lat")
    return work / "lat"


def _npy(work, m, name):
    return _latents_copy(work, m) / name


def _truncate(path, keep=100):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _rewrite(path, fn):
    arr = np.load(path)
    np.save(path, fn(arr))


def _json(work, name, text):
    p = work / name
    p.write_text(text)
    return p


def _broken_export_config(work, m):
    """A copy of the module's run whose export/config.json was cut short."""
    shutil.copytree(m / "runs" / "digits-dit", work / "run")
    (work / "run" / "export" / "config.json").write_text("{")
    return work / "run"


def _stale_parts(out):
    """``<out>.parts/`` as an earlier run with other settings left it, one batch done."""
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "settings.json").write_text('{"cfg_scale": 4.0}')
    np.savez(parts / "batch_000000.npz", arr_0=np.zeros((2, 16, 16, 1), np.uint8), arr_1=np.zeros(2, np.int64))
    return out


def _other_size_checkpoint(work, m):
    return m / "runs" / "digits-dit" / "checkpoints" / "step_00000001"


def _damaged_checkpoint(work, m, victim):
    src = m / "runs" / "digits-dit" / "checkpoints" / "step_00000001"
    dst = work / "ck" / "step_00000001"
    shutil.copytree(src, dst)
    if victim == "truncate":
        _truncate(dst / "__0_0.distcp", 50)
    else:
        (dst / victim).unlink()
    return dst


CASES = [
    # --- command line -----------------------------------------------------------------------------------
    ("cli-unknown-key", lambda w, m: _train(w, "--train.stepz=3"),
     "masked-dit train: error: unknown key --train.stepz; valid keys of train: ..."),
    ("cli-unknown-section", lambda w, m: _train(w, "--trian.steps=3"),
     "masked-dit train: error: unknown config section 'trian'; valid: run, model, data, objective, optim, train, "
     "parallel, sample"),
    ("cli-bad-int", lambda w, m: _train(w, "--train.steps=abc"),
     "masked-dit train: error: --train.steps='abc' is not a valid int"),
    ("cli-zero-steps", lambda w, m: _train(w, "--train.steps=0"),
     "masked-dit train: error: --train.steps must be > 0 (got 0)"),
    ("cli-bad-choice", lambda w, m: _train(w, "--optim.name=sgd"),
     "masked-dit train: error: --optim.name='sgd' is not valid; choose one of: adamw, adan"),
    ("cli-unknown-preset", lambda w, m: ["train", "--preset", "nope"],
     "masked-dit train: error: unknown preset 'nope'; valid: ..."),
    ("cli-batch-not-divisible", lambda w, m: _train(w, "--train.micro_batch=3"),
     "masked-dit train: error: --train.global_batch=8 must be a multiple of micro_batch (3) x world size (1)"),
    ("cli-max-nonfinite-zero", lambda w, m: _train(w, "--train.max_nonfinite_steps=0"),
     "masked-dit train: error: --train.max_nonfinite_steps must be > 0 (got 0)"),
    # found by fuzzing the command line (tests/reliability/test_cli_fuzz.py): each was a traceback, a
    # message naming no option, or a failure only after training
    ("cli-micro-batch-zero", lambda w, m: _train(w, "--train.micro_batch=0"),
     "masked-dit train: error: --train.micro_batch must be > 0, or none for global_batch / world size (got 0)"),
    ("cli-hidden-size-zero", lambda w, m: _train(w, "--model.hidden_size=0"),
     "masked-dit train: error: --model.hidden_size must be > 0, or none for the registry's value (got 0)"),
    ("cli-num-classes-below-digits", lambda w, m: _train(w, "--model.num_classes=1"),
     "masked-dit train: error: digits hold 10 classes (labels 0-9) but the model has --model.num_classes=1"),
    ("cli-num-classes-zero", lambda w, m: _train(w, "--model.num_classes=0"),
     "masked-dit train: error: --model.num_classes must be >= 1 for --objective.kind=adm (got 0)"),
    ("cli-class-dropout-range", lambda w, m: _train(w, "--model.class_dropout_prob=1.5"),
     "masked-dit train: error: --model.class_dropout_prob must be in [0, 1] (got 1.5)"),
    ("cli-cfg-without-null-class", lambda w, m: _train(w, "--model.class_dropout_prob=0"),
     "masked-dit train: error: --sample.cfg_scale=4.0 needs the null class that label dropout trains, but "
     "--model.class_dropout_prob=0 leaves it out: set --sample.cfg_scale=1 or --model.class_dropout_prob > 0"),
    ("cli-lr-nan", lambda w, m: _train(w, "--optim.lr=nan"),
     "masked-dit train: error: --optim.lr must be a finite number > 0 (got nan)"),
    ("cli-weight-decay-negative", lambda w, m: _train(w, "--optim.weight_decay=-1"),
     "masked-dit train: error: --optim.weight_decay must be a finite number >= 0 (got -1.0)"),
    ("cli-num-workers-negative", lambda w, m: _train(w, "--data.num_workers=-1"),
     "masked-dit train: error: --data.num_workers must be >= 0 (got -1)"),
    ("cli-latent-scale-zero", lambda w, m: _train(w, "--data.latent_scale=0"),
     "masked-dit train: error: --data.latent_scale must be a finite number > 0 (got 0.0)"),
    # SiT's sample.py options: checked before the first step (a grid at step N would stop the run there)
    ("cli-sit-option-on-dit", lambda w, m: _train(w, "--sample.diffusion_form=SBDM"),
     "masked-dit train: error: --sample.diffusion_form='SBDM' is a SiT sampler option: it applies to "
     "--objective.kind=transport only (got adm)"),
    # MaskDiT's (EDM's) sample.py options: refused elsewhere, and a grid that cannot be built is caught up front
    ("cli-maskdit-option-on-dit", lambda w, m: _train(w, "--sample.S_churn=40"),
     "masked-dit train: error: --sample.S_churn=40.0 is a MaskDiT sampler option: it applies to "
     "--objective.kind=edm_maskdit only (got adm)"),
    # was an overflow inside torch.manual_seed; batch generators pack (seed, batch) into 64 bits
    ("cli-seed-beyond-32-bits", lambda w, m: _train(w, "--run.seed=4294967296"),
     "masked-dit train: error: --run.seed must be in [0, 2**32) (got 4294967296)"),
    # ADM's DDIM eta: read by the ddim sampler only, NaN past 1, refused on the other families
    ("cli-ddim-eta-with-ddpm", lambda w, m: _train(w, "--sample.eta=0.5"),
     "masked-dit train: error: --sample.eta=0.5 is read by the ddim sampler only (this run samples with ddpm)"),
    ("cli-ddim-eta-above-one", lambda w, m: _train(w, "--sample.sampler=ddim", "--sample.eta=1.2"),
     "masked-dit train: error: --sample.eta=1.2 must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's "
     "variance)"),
    ("cli-ddim-eta-on-sit", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.eta=0.5"),
     "masked-dit train: error: --sample.eta=0.5 is a DiT/MDT sampler option: it applies to --objective.kind=adm or "
     "mdtv2 only (got transport)"),
    ("cli-maskdit-vp-grid-beyond-its-range", lambda w, m: _train(w, "--preset", "digits-maskdit",
                                                                 "--sample.discretization=vp", "--sample.sigma_min=5",
                                                                 "--sample.sigma_max=10"),
     "masked-dit train: error: --sample.discretization=vp: the vp discretization cannot span sigma_min=5.0 .. "
     "sigma_max=10.0: its sigma(t) peaks above sigma_max inside [epsilon_s, 1] (beta_d = -6513); lower sigma_min or "
     "raise sigma_max"),
    ("cli-sit-eps-on-linear-velocity", lambda w, m: _train(w, "--preset", "digits-sit", "--objective.train_eps=0.001"),
     "masked-dit train: error: --objective.train_eps=0.001 is not read for a Linear velocity model (SiT trains and "
     "samples it on [0, 1] and ignores the cut-off): leave it unset"),
    # MaskDiT's mask-ratio schedule: its fine-tune config's "cos4" is not a name its code knows (a bug there)
    ("cli-maskdit-mask-ratio-fn-cos4", lambda w, m: _train(w, "--preset", "digits-maskdit",
                                                           "--objective.mask_ratio_fn=cos4"),
     "masked-dit train: error: --objective.mask_ratio_fn='cos4' is not valid; choose one of: constant, cosine2, "
     "cosine3, cosine4, cosine5, cosine6, exp, linear"),
    ("cli-mask-ratio-fn-on-mdtv2", lambda w, m: _train(w, "--preset", "digits-mdtv2",
                                                       "--objective.mask_ratio_fn=cosine4"),
     "masked-dit train: error: --objective.mask_ratio_fn=cosine4 / mask_ratio_min is MaskDiT's schedule: it applies "
     "to --objective.kind=edm_maskdit only (got mdtv2)"),
    ("cli-sit-diffusion-form-unknown", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.sampler=sde",
                                                           "--sample.diffusion_form=SDBM"),
     "masked-dit train: error: --sample.diffusion_form=SDBM is not valid; choose one of: constant, SBDM, sigma, "
     "linear, decreasing, increasing-decreasing"),
    ("cli-sit-heun-sde-ending-on-data", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.sampler=sde",
                                                            "--sample.sde_method=Heun", "--sample.last_step=None"),
     "masked-dit train: error: --sample.sde_method=Heun: sample_sde: method='Heun' with last_step=None ends at "
     "t=1.0, where sigma_t = 0 makes the score of a Linear velocity model singular; use last_step='Mean' (SiT's "
     "default) or method='Euler'"),
    ("cli-sit-atol-zero", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.atol=0"),
     "masked-dit train: error: --sample.atol=0.0 must be a finite number > 0 (got 0.0)"),
    ("cli-sit-ode-method-unknown", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.ode_method=rk45"),
     "masked-dit train: error: --sample.ode_method=rk45: unknown ODE method 'rk45'; expected one of ('euler', "
     "'midpoint', 'heun', 'dopri5') or a torchdiffeq method"),
    ("cli-sit-option-the-sampler-ignores", lambda w, m: _train(w, "--preset", "digits-sit", "--sample.sampler=sde",
                                                               "--sample.ode_method=midpoint"),
     "masked-dit train: error: --sample.ode_method=midpoint is read by the ode sampler only (this run samples with sde)"),
    ("cli-num-per-class-zero", lambda w, m: _train(w, "--sample.num_per_class=0"),
     "masked-dit train: error: --sample.num_per_class must be > 0 (got 0)"),
    ("cli-grid-classes-empty", lambda w, m: _train(w, "--sample.grid_classes=[]"),
     "masked-dit train: error: --sample.grid_classes=[] must be a non-empty list of class labels, e.g. [0,3,7], "
     "or none"),
    ("cli-grid-classes-out-of-range", lambda w, m: _train(w, "--sample.grid_classes=3,30,-1"),
     "masked-dit train: error: --sample.grid_classes [30, -1] are outside [0, 9] (--model.num_classes=10)"),
    ("cli-guidance-interval-reversed", lambda w, m: _train(w, "--sample.guidance_low=0.8",
                                                           "--sample.guidance_high=0.2"),
     "masked-dit train: error: --sample.guidance_low=0.8 must be <= --sample.guidance_high=0.2 (guidance applies "
     "for t in [low, high])"),
    # were accepted: a negative warmup or eval_num silently meant none, a NaN scale wrote NaN metrics
    ("cli-warmup-negative", lambda w, m: _train(w, "--optim.warmup_steps=-3"),
     "masked-dit train: error: --optim.warmup_steps must be >= 0 (got -3)"),
    ("cli-eval-num-negative", lambda w, m: _train(w, "--sample.eval_num=-1"),
     "masked-dit train: error: --sample.eval_num must be >= 0 (got -1)"),
    ("cli-cfg-scale-nan", lambda w, m: _train(w, "--sample.cfg_scale=nan"),
     "masked-dit train: error: --sample.cfg_scale must be a finite number (got nan)"),
    # was found at the first grid, after the training steps: DDIM's integer stride cannot make 999 of 1000
    ("cli-ddim-steps-unmakeable", lambda w, m: _train(w, "--sample.sampler=ddim", "--sample.steps=999"),
     "masked-dit train: error: --sample.steps=999: 999 DDIM steps cannot be taken from 1000 diffusion steps (cannot "
     "create exactly 999 steps with an integer stride from 1000)"),
    ("cli-cfg-scale-negative", lambda w, m: _train(w, "--sample.cfg_scale=-2"),
     "masked-dit train: error: --sample.cfg_scale must be >= 0 (1: no guidance, above 1: toward the class; got -2.0)"),
    ("cli-scale-pow-negative", lambda w, m: _train(w, "--sample.scale_pow=-1"),
     "masked-dit train: error: --sample.scale_pow must be >= 0 (0: constant guidance scale; got -1.0)"),
    # was found only at the first sample grid, after the training steps (at the end with the digits presets)
    ("cli-sampler-of-other-objective", lambda w, m: _train(w, "--sample.sampler=heun"),
     "masked-dit train: error: --sample.sampler=heun does not apply to --objective.kind=adm; choose one of: auto, "
     "ddpm, ddim"),
    ("cli-config-and-preset", lambda w, m: ["train", "--config", str(_json(w, "c.json", "{}")), "--preset",
                                            "digits-sit"],
     "masked-dit train: error: --config {work}/c.json and --preset digits-sit exclude each other; a config file "
     "holds a whole config (override fields with --section.key=value)"),
    # --- config files -------------------------------------------------------------------------------------
    ("config-missing", lambda w, m: ["train", "--config", str(w / "nope.json")],
     "masked-dit train: error: config file {work}/nope.json does not exist"),
    ("config-is-folder", lambda w, m: ["train", "--config", str(m / "runs/digits-dit")],
     "masked-dit train: error: config file {m}/runs/digits-dit is a folder; name the JSON file (e.g. "
     "{m}/runs/digits-dit/config.json)"),
    ("config-not-json", lambda w, m: ["train", "--config", str(_json(w, "c.json", "{not json"))],
     "masked-dit train: error: config file {work}/c.json is not valid JSON: Expecting property name enclosed in "
     "double quotes: line 1 column 2 (char 1)"),
    ("config-not-object", lambda w, m: ["train", "--config", str(_json(w, "c.json", "[1, 2]"))],
     "masked-dit train: error: config file {work}/c.json must hold a JSON object of sections (got list)"),
    ("config-section-not-object", lambda w, m: ["train", "--config", str(_json(w, "c.json", '{"train": 5}'))],
     "masked-dit train: error: config file {work}/c.json: section 'train' must be an object of key: value (got int)"),
    ("config-unknown-key", lambda w, m: ["train", "--config", str(_json(w, "c.json", '{"train": {"stepz": 3}}'))],
     "masked-dit train: error: config file {work}/c.json: unknown key --train.stepz; valid keys of train: ..."),
    ("config-bad-value", lambda w, m: ["train", "--config", str(_json(w, "c.json", '{"train": {"steps": "x"}}'))],
     "masked-dit train: error: config file {work}/c.json: --train.steps='x' is not a valid int"),
    # --- image folders ------------------------------------------------------------------------------------
    ("folder-missing", lambda w, m: _train(w, "--data.source=folder", f"--data.path={w / 'none'}", *FOLDER_MODEL),
     "masked-dit train: error: image folder '{work}/none' does not exist"),
    ("folder-empty", lambda w, m: (os.makedirs(w / "empty"), _train(w, "--data.source=folder",
                                                                     f"--data.path={w / 'empty'}", *FOLDER_MODEL))[1],
     "masked-dit train: error: no images (.jpg, .jpeg, .png, .gif, .bmp, .webp, .tif, .tiff, .ppm, .pgm) found under "
     "'{work}/empty'"),
    ("folder-too-many-classes", lambda w, m: _train(w, "--data.source=folder",
                                                     f"--data.path={_images(w / 'i3', 'abc')}", *FOLDER_MODEL),
     "masked-dit train: error: image folder {work}/i3 has 3 classes but the model has --model.num_classes=2"),
    ("folder-wrong-channels", lambda w, m: _train(w, "--data.source=folder", f"--data.path={m / 'images'}",
                                                  "--model.input_size=16", "--model.num_classes=2"),
     "masked-dit train: error: data gives 3x16x16 inputs but the model expects --model.in_channels=1 "
     "--model.input_size=16"),
    ("folder-undersized-image", lambda w, m: _train(w, "--data.source=folder",
                                                    f"--data.path={_images(w / 'small', size=8)}", *FOLDER_MODEL),
     "masked-dit train: error: image {work}/small/..."),
    ("folder-unreadable-image", lambda w, m: _train(w, "--data.source=folder", f"--data.path={_broken_images(w)}",
                                                    *FOLDER_MODEL),
     "masked-dit train: error: unreadable image {work}/broken/..."),
    ("folder-unreadable-image-workers", lambda w, m: _train(w, "--data.source=folder",
                                                            f"--data.path={_broken_images(w)}", *FOLDER_MODEL,
                                                            "--data.num_workers=2"),
     "masked-dit train: error: unreadable image {work}/broken/..."),  # not the worker's traceback
    # --- latent shards ------------------------------------------------------------------------------------
    ("latents-no-manifest", lambda w, m: _train(w, "--data.source=latents", f"--data.path={w}", *LATENT_MODEL),
     "masked-dit train: error: no manifest.json in '{work}': run `masked-dit extract-latents` first"),
    ("latents-missing-shard", lambda w, m: _train(w, "--data.source=latents",
                                                  f"--data.path={_unlink(_npy(w, m, 'shard_00001.std.npy'))}",
                                                  *LATENT_MODEL),
     "masked-dit train: error: latents {work}/lat: shard file shard_00001.std.npy is missing"),
    ("latents-truncated-shard", lambda w, m: _train(w, "--data.source=latents",
                                                    "--data.path="
                                                    + str(_apply(_npy(w, m, "shard_00000.mean.npy"), _truncate)),
                                                    *LATENT_MODEL),
     "masked-dit train: error: latents {work}/lat: shard file shard_00000.mean.npy is truncated or not a .npy array"),
    ("latents-wrong-shape", lambda w, m: _train(w, "--data.source=latents", "--data.path=" + str(_apply(
        _npy(w, m, "shard_00001.mean.npy"), lambda p: _rewrite(p, lambda a: a[:, :3]))), *LATENT_MODEL),
     "masked-dit train: error: latents {work}/lat: shard_00001.mean.npy has shape [4, 3, 4, 4], expected "
     "[4, 4, 4, 4]"),
    ("latents-label-out-of-range", lambda w, m: _train(w, "--data.source=latents", "--data.path=" + str(_apply(
        _npy(w, m, "shard_00001.labels.npy"), lambda p: _rewrite(p, lambda a: a + 5))), *LATENT_MODEL),
     "masked-dit train: error: latents {work}/lat hold labels up to 6 but the model has --model.num_classes=2"),
    ("latents-nan", lambda w, m: _train(w, "--data.source=latents", "--data.path=" + str(_apply(
        _npy(w, m, "shard_00000.std.npy"), lambda p: _rewrite(p, lambda a: a * np.nan))), *LATENT_MODEL),
     "masked-dit train: error: latents {work}/lat: non-finite values in shard_00000.std.npy row ..."),
    ("latents-manifest-not-json", lambda w, m: _train(w, "--data.source=latents", "--data.path=" + str(
        _json(w, "manifest.json", "{not json").parent), *LATENT_MODEL),
     "masked-dit train: error: latents {work}: manifest.json is not valid JSON (Expecting property name enclosed in "
     "double quotes: line 1 column 2 (char 1))"),
    ("features-foreign-manifest", lambda w, m: ["extract-features", str(m / "images"), str(
        _json(w, "manifest.json", '{"complete": true}').parent)],
     "masked-dit extract-features: error: latents {work}: manifest.json is not one extract-latents wrote (bad or "
     "missing 'flip'): re-run extract-latents"),
    ("latents-wrong-model-shape", lambda w, m: _train(w, "--data.source=latents", f"--data.path={m / 'latents'}",
                                                      "--model.in_channels=4", "--model.input_size=8"),
     "masked-dit train: error: data gives 4x4x4 inputs but the model expects --model.in_channels=4 "
     "--model.input_size=8"),
    # --- checkpoints --------------------------------------------------------------------------------------
    ("resume-not-a-checkpoint", lambda w, m: _train(w, "--resume", str(w)),
     "masked-dit train: error: --resume {work}: not a complete checkpoint folder (no meta.json); complete ones: none"),
    ("fresh-run-over-checkpoints", lambda w, m: (shutil.copytree(m / "runs" / "digits-dit", w / "runs" / "digits-dit"),
                                                 _train(w))[1],
     "masked-dit train: error: run folder {work}/runs/digits-dit already has checkpoints (newest: step_00000001); "
     "pass --resume latest to continue it, or another --run.name / --run.out_dir to start anew"),
    ("init-from-missing", lambda w, m: _train(w, f"--run.init_from={w / 'nothing'}"),
     "masked-dit train: error: --run.init_from {work}/nothing: no such file or folder"),
    ("init-from-other-model", lambda w, m: _train(w, f"--run.init_from={m / 'runs' / 'digits-dit'}",
                                                  "--model.hidden_size=64"),
     "masked-dit train: error: checkpoint {m}/runs/digits-dit/checkpoints/step_00000001 does not fit DiT-S/2: "
     "shape mismatches ..."),
    ("resume-other-model-size", lambda w, m: _train(w, "--model.hidden_size=64", "--resume",
                                                    str(_other_size_checkpoint(w, m))),
     "masked-dit train: error: checkpoint {m}/runs/digits-dit/checkpoints/step_00000001 does not fit DiT-S/2: "
     "shape mismatches ..."),
    ("resume-other-model", lambda w, m: _train(w, "--model.name=SiT-S/2", "--objective.kind=transport",
                                               "--sample.sampler=ode", "--resume",
                                               str(_other_size_checkpoint(w, m))),
     "masked-dit train: error: checkpoint {m}/runs/digits-dit/checkpoints/step_00000001 holds a DiT-S/2 model, "
     "not SiT-S/2"),
    ("resume-other-optimizer", lambda w, m: _train(w, "--optim.name=adan", "--optim.betas=0.98,0.92,0.99",
                                                   "--resume", str(_other_size_checkpoint(w, m))),
     "masked-dit train: error: checkpoint {m}/runs/digits-dit/checkpoints/step_00000001 holds AdamW state but this "
     "run uses Adan (--optim.name): resume with the optimizer it was saved with, or take its weights only with "
     "--run.init_from"),
    ("resume-missing-shard", lambda w, m: _train(w, "--resume", str(_damaged_checkpoint(w, m, "__0_0.distcp"))),
     "masked-dit train: error: checkpoint {work}/ck/step_00000001 is damaged: __0_0.distcp is missing or truncated"),
    ("resume-truncated-shard", lambda w, m: _train(w, "--resume", str(_damaged_checkpoint(w, m, "truncate"))),
     "masked-dit train: error: checkpoint {work}/ck/step_00000001 is damaged: __0_0.distcp is missing or truncated"),
    ("resume-missing-rank-file", lambda w, m: _train(w, "--resume", str(_damaged_checkpoint(w, m, "rank_00000.pt"))),
     "masked-dit train: error: checkpoint {work}/ck/step_00000001 is damaged: rank_00000.pt is missing"),
    ("sample-not-a-run", lambda w, m: ["sample", str(w)],
     "masked-dit sample: error: {work} is not a run folder (no export/config.json, no complete checkpoint with the "
     "run's config.json): train first"),
    ("sample-missing-file", lambda w, m: ["sample", str(w / "x.pt"), "--model", "DiT-S/2"],
     "masked-dit sample: error: checkpoint not found: {work}/x.pt"),
    ("sample-truncated-safetensors", lambda w, m: ["sample", str(_apply(_copy(
        m / "runs/digits-dit/export/ema.safetensors", w / "e.safetensors"), _truncate)),
                                                   "--model", "DiT-S/2"],
     "masked-dit sample: error: {work}/e.safetensors: unreadable checkpoint (..."),
    ("sample-garbage-pt", lambda w, m: ["sample", str(_json(w, "x.pt", "not a checkpoint")), "--model", "DiT-S/2"],
     "masked-dit sample: error: {work}/x.pt: unreadable checkpoint (..."),
    ("sample-missing-run-folder", lambda w, m: ["sample", str(w / "no_run")],
     "masked-dit sample: error: checkpoint not found: {work}/no_run"),
    ("sample-steps-zero", lambda w, m: _sample(w, m, "--steps", "0"),
     "masked-dit sample: error: --steps must be >= 1 (got 0)"),
    ("sample-per-class-negative", lambda w, m: _sample(w, m, "--per-class", "-1"),
     "masked-dit sample: error: --per-class must be >= 1 (got -1)"),
    # were ignored: each output reads one count
    ("sample-num-samples-with-grid", lambda w, m: _sample(w, m, "--num-samples", "16"),
     "masked-dit sample: error: --num-samples is read for .npz output; the grid --out {work}/g.png has "
     "--per-class columns per class: use --per-class"),
    ("sample-per-class-with-npz", lambda w, m: ["sample", str(m / "runs/digits-dit"), "--out", str(w / "s.npz"),
                                                "--per-class", "2"],
     "masked-dit sample: error: --per-class sets the columns of a .png grid; the .npz --out {work}/s.npz holds "
     "--num-samples samples: use --num-samples"),
    ("sample-classes-empty", lambda w, m: _sample(w, m, "--classes"),
     "masked-dit sample: error: --classes needs at least one class label (or leave it out)"),
    ("sample-out-is-folder", lambda w, m: (os.makedirs(w / "o.npz"), ["sample", str(m / "runs/digits-dit"),
                                                                        "--out", str(w / "o.npz")])[1],
     "masked-dit sample: error: --out {work}/o.npz is a folder; name a file ending in .npz or .png"),
    ("sample-model-kwargs-not-object", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                                     "--model", "DiT-S/2", "--model-kwargs", "[1]"],
     "masked-dit sample: error: --model-kwargs must be a JSON object of constructor arguments, e.g. "
     "'{\"num_classes\": 10}' (got list)"),
    ("sample-model-kwargs-bad-json", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                                   "--model", "DiT-S/2", "--model-kwargs", "{bad"],
     "masked-dit sample: error: --model-kwargs '{bad' is not valid JSON (Expecting property name enclosed in "
     "double quotes: line 1 column 2 (char 1))"),
    ("sample-model-kwargs-unknown", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                                  "--model", "DiT-S/2", "--model-kwargs", '{"bogus": 1}'],
     "masked-dit sample: error: --model-kwargs: cannot build DiT-S/2 (DiT.__init__() got an unexpected keyword "
     "argument 'bogus')"),
    ("sample-vae-missing", lambda w, m: _sample(w, m, "--vae", str(w / "novae")),
     "masked-dit sample: error: --vae {work}/novae: no such folder (a save_pretrained AutoencoderKL folder "
     "or a hub id)"),
    ("sample-model-with-run-folder", lambda w, m: _sample(w, m, "--model", "DiT-B/2"),
     "masked-dit sample: error: --model describes an official checkpoint file; the folder "
     "{m}/runs/digits-dit brings its own model config: leave it out"),
    ("sample-path-type-with-run-folder", lambda w, m: _sample(w, m, "--path-type", "GVP"),
     "masked-dit sample: error: --path-type describes an official checkpoint file; the folder "
     "{m}/runs/digits-dit brings its own model config: leave it out"),
    ("sample-path-type-not-sit", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                               "--model", "DiT-S/2", "--path-type", "GVP"],
     "masked-dit sample: error: --path-type is a SiT / REPA interpolant option: DiT-S/2 is not one"),
    ("sample-truncated-pt", lambda w, m: ["sample", str(_apply(_torch_saved(w, m), _truncate)), "--model", "DiT-S/2"],
     "masked-dit sample: error: {work}/e.pt: unreadable checkpoint (ValueError: a torch.save zip archive without "
     "its central directory: the file is truncated or damaged (re-download or re-save it))"),
    ("sample-cfg-scale-nan", lambda w, m: _sample(w, m, "--cfg-scale", "nan"),
     "masked-dit sample: error: --cfg-scale must be a finite number (got nan)"),
    ("sample-guidance-interval-reversed", lambda w, m: _sample(w, m, "--guidance-low", "0.9",
                                                               "--guidance-high", "0.1"),
     "masked-dit sample: error: --guidance-low=0.9 must be <= --guidance-high=0.1 (guidance applies for t in "
     "[low, high])"),
    # were accepted: a negative scale extrapolates away from the class (a typo for 1.5, not a setting)
    ("sample-bad-out", lambda w, m: ["sample", str(m / "runs/digits-dit"), "--out", str(w / "x.jpg")],
     "masked-dit sample: error: --out {work}/x.jpg: must end in .npz (samples for FID) or .png (a grid)"),
    ("sample-parts-other-settings", lambda w, m: ["sample", str(m / "runs/digits-dit"), "--out",
                                                  str(_stale_parts(w / "c.npz")), "--num-samples", "2"],
     "masked-dit sample: error: {work}/c.npz.parts holds batches made with other settings (..."),
    ("sample-sampler-of-another-family", lambda w, m: _sample(w, m, "--sampler", "ode", "--eta", "0.5"),
     "masked-dit sample: error: --sampler ode does not apply to objective adm; choose one of: ddpm, ddim"),
    ("sample-export-config-not-json", lambda w, m: ["sample", str(_broken_export_config(w, m)), "--out",
                                                    str(w / "g.png")],
     "masked-dit sample: error: {work}/run/export/config.json is not valid JSON (..."),
    ("sample-cfg-scale-negative", lambda w, m: _sample(w, m, "--cfg-scale", "-1.5"),
     "masked-dit sample: error: --cfg-scale must be >= 0 (1: no guidance, above 1: toward the class; got -1.5)"),
    ("sample-ddpm-steps-beyond-the-diffusion", lambda w, m: _sample(w, m, "--steps", "1001"),
     "masked-dit sample: error: --steps 1001: 1001 DDPM steps cannot be taken from 1000 diffusion steps (cannot "
     "divide a section of 1000 steps into 1001)"),
    ("sample-sit-option-on-dit", lambda w, m: _sample(w, m, "--last-step-size", "0.1"),
     "masked-dit sample: error: --last-step-size is a SiT sampler option: it applies to SiT models (objective adm)"),
    ("sample-maskdit-option-on-dit", lambda w, m: _sample(w, m, "--S-churn", "10"),
     "masked-dit sample: error: --S-churn is a MaskDiT sampler option: it applies to MaskDiT models (objective adm)"),
    ("sample-ddim-eta-with-ddpm", lambda w, m: _sample(w, m, "--eta", "0.3"),
     "masked-dit sample: error: --eta is read by the ddim sampler only (this run samples with ddpm)"),
    ("sample-ddim-eta-negative", lambda w, m: _sample(w, m, "--sampler", "ddim", "--eta", "-0.1"),
     "masked-dit sample: error: --eta -0.1 must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance)"),
    ("sample-seed-negative", lambda w, m: _sample(w, m, "--seed=-1"),
     "masked-dit sample: error: --seed must be in [0, 2**32) (got -1)"),
    ("sample-guidance-high-below-the-runs-low", lambda w, m: _sample(w, m, "--guidance-high", "-0.5"),
     "masked-dit sample: error: --guidance-high must be in [0, 1]: REPA's guidance interval is over the time t in "
     "[0, 1] (got -0.5)"),
    # --- likelihood ---------------------------------------------------------------------------------------
    ("likelihood-of-a-dit-run", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--out", str(w / "n.json")],
     "masked-dit likelihood: error: {m}/runs/digits-dit: the probability-flow likelihood is SiT's (objective "
     "transport or repa); this model's objective is adm"),
    ("likelihood-seed-beyond-32-bits", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--out",
                                                     str(w / "n.json"), "--seed", str(1 << 40)],
     "masked-dit likelihood: error: --seed must be in [0, 2**32) (got 1099511627776)"),
    ("likelihood-out-not-json", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--out", str(w / "n.txt")],
     "masked-dit likelihood: error: --out {work}/n.txt: must end in .json"),
    ("likelihood-steps-zero", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--steps", "0"],
     "masked-dit likelihood: error: --steps 0: the ODE grid needs at least 2 time points (both ends included)"),
    ("likelihood-out-is-a-file-of-the-run", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--out",
                                                          str(m / "runs/digits-dit/config.json")],
     "masked-dit likelihood: error: --out {m}/runs/digits-dit/config.json is a file of {m}/runs/digits-dit: writing "
     "it would replace part of the run; name a new file"),
    ("likelihood-one-step", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--steps", "1"],
     "masked-dit likelihood: error: --steps 1: the ODE grid needs at least 2 time points (both ends included)"),
    ("likelihood-no-samples", lambda w, m: ["likelihood", str(m / "runs/digits-dit"), "--num-samples", "0"],
     "masked-dit likelihood: error: --num-samples must be >= 1 (got 0)"),
    # --- extract-latents ----------------------------------------------------------------------------------
    ("extract-batch-size-zero", lambda w, m: ["extract-latents", str(m / "images"), str(w / "lat"),
                                              "--batch-size", "0"],
     "masked-dit extract-latents: error: --batch-size must be >= 1 (got 0)"),
    # was "shard_size (4) must be a multiple of batch_size (32)", after loading the VAE
    ("extract-shard-not-multiple-of-batch", lambda w, m: ["extract-latents", str(m / "images"), str(w / "lat"),
                                                          "--shard-size", "4", "--batch-size", "32"],
     "masked-dit extract-latents: error: --shard-size 4 must be a multiple of --batch-size 32"),
    # was "image folder ... does not exist" for a file that exists
    ("extract-images-is-file", lambda w, m: ["extract-latents", str(m / "images/a/0.png"), str(w / "lat"),
                                             "--device", "cpu"],
     "masked-dit extract-latents: error: image folder '{m}/images/a/0.png' is a file; name the folder that holds "
     "the images"),
    ("extract-out-is-file", lambda w, m: ["extract-latents", str(m / "images"), str(_json(w, "f.txt", "x"))],
     "masked-dit extract-latents: error: output folder {work}/f.txt is a file"),
    ("extract-bad-device", lambda w, m: ["extract-latents", str(m / "images"), str(w / "lat"), "--device", "gpu"],
     "masked-dit extract-latents: error: --device: unknown device 'gpu'"),
    ("extract-vae-missing", lambda w, m: ["extract-latents", str(m / "images"), str(w / "lat"),
                                          "--vae", str(w / "novae"), "--device", "cpu"],
     "masked-dit extract-latents: error: --vae {work}/novae: no such folder (a save_pretrained AutoencoderKL folder "
     "or a hub id)"),
    ("sample-wrong-model", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                         "--model", "DiT-B/2",
                                         "--model-kwargs", '{"in_channels": 1, "num_classes": 10}'],
     "masked-dit sample: error: checkpoint {m}/runs/digits-dit/export/ema.safetensors does not fit DiT-B/2: ..."),
    ("sample-wrong-num-classes", lambda w, m: ["sample", str(m / "runs/digits-dit/export/ema.safetensors"),
                                               "--model", "DiT-S/2", "--model-kwargs",
                                               '{"in_channels": 1, "num_classes": 5, "depth": 2, "hidden_size": 32, '
                                               '"num_heads": 2, "patch_size": 4}'],
     "masked-dit sample: error: checkpoint {m}/runs/digits-dit/export/ema.safetensors does not fit DiT-S/2: "
     "shape mismatches (1): y_embedder.embedding_table.weight [11, 32] vs model [6, 32]"),
    # --- session 17: lost work through another way into the run, damaged meta.json, ranges -------------------
    # were written: the run's config.json replaced by samples or bits/dim when the source was its export
    # or one of its checkpoints (only the run folder itself was guarded)
    ("sample-out-is-a-file-of-the-run-via-export", lambda w, m: ["sample", str(m / "runs/digits-dit/export"),
                                                                 "--out", str(m / "runs/digits-dit/samples.png")],
     "masked-dit sample: error: --out {m}/runs/digits-dit/samples.png is a file of {m}/runs/digits-dit: writing it "
     "would replace part of the run; name a new file"),
    ("likelihood-out-is-a-file-of-the-run-via-checkpoint", lambda w, m: [
        "likelihood", str(m / "runs/digits-dit/checkpoints/step_00000001"), "--out",
        str(m / "runs/digits-dit/export/config.json")],
     "masked-dit likelihood: error: --out {m}/runs/digits-dit/export/config.json is a file of {m}/runs/digits-dit: "
     "writing it would replace part of the run; name a new file"),
    # were: a fresh start replaced the export, samples and metrics of a run whose checkpoints were removed
    ("train-over-a-run-without-checkpoints", lambda w, m: _train(_without_checkpoints(w, m)),
     "masked-dit train: error: run folder {work}/runs/digits-dit holds an earlier run's export/ema.safetensors but no "
     "checkpoint to continue from; starting at step 0 would replace it: choose another --run.name / --run.out_dir, "
     "or remove the folder"),
    ("train-resume-a-run-without-checkpoints", lambda w, m: _train(_without_checkpoints(w, m), "--resume", "latest"),
     "masked-dit train: error: run folder {work}/runs/digits-dit holds an earlier run's export/ema.safetensors but no "
     "checkpoint to continue from; starting at step 0 would replace it: choose another --run.name / --run.out_dir, "
     "or remove the folder"),
    ("train-over-a-run-killed-before-its-first-checkpoint", lambda w, m: _train(_log_only(w)),
     "masked-dit train: error: run folder {work}/runs/digits-dit holds an earlier run's metrics.jsonl but no "
     "checkpoint to continue from; starting at step 0 would replace it: choose another --run.name / --run.out_dir, "
     "or remove the folder (--resume latest starts it over there)"),
    # were: KeyError 'world_size', AttributeError, or a bare JSON message naming no file
    ("resume-meta-json-edited", lambda w, m: _train(w, "--resume", str(_edited_meta(w, m, "{}"))),
     "masked-dit train: error: checkpoint {work}/run/checkpoints/step_00000001 is damaged: meta.json lacks an integer "
     "step >= 0 and world_size >= 1"),
    ("resume-meta-json-torn", lambda w, m: _train(w, "--resume", str(_edited_meta(w, m, "{"))),
     "masked-dit train: error: checkpoint {work}/run/checkpoints/step_00000001 is damaged: meta.json is unreadable "
     "(JSONDecodeError)"),
    ("sample-meta-json-a-list", lambda w, m: ["sample", str(_edited_meta(w, m, "[]").parent.parent), "--out",
                                              str(w / "g.png")],
     "masked-dit sample: error: checkpoint {work}/run/checkpoints/step_00000001 is damaged: meta.json lacks an "
     "integer step >= 0 and world_size >= 1"),
    # were accepted: an interval outside [0, 1] guided no step (or every step) without a word
    ("sample-guidance-interval-beyond-the-time-range", lambda w, m: _sample(w, m, "--guidance-low", "2",
                                                                            "--guidance-high", "3"),
     "masked-dit sample: error: --guidance-low must be in [0, 1]: REPA's guidance interval is over the time t in "
     "[0, 1] (got 2.0)"),
    ("cli-guidance-high-beyond-one", lambda w, m: _train(w, "--sample.guidance_high=1.5"),
     "masked-dit train: error: --sample.guidance_high must be in [0, 1]: REPA's guidance interval is over the time "
     "t in [0, 1] (got 1.5)"),
    # were accepted: the run or the features went outside their folder, or straight into it
    ("cli-run-name-not-one-folder", lambda w, m: _train(w, "--run.name=../escape"),
     "masked-dit train: error: --run.name='../escape' must be one folder name (the run goes to <out_dir>/<name>)"),
    ("features-name-not-one-folder", lambda w, m: ["extract-features", str(m / "images"), str(m / "latents"),
                                                   "--name", "../evil"],
     "masked-dit extract-features: error: --name '../evil' must be one folder name (the features go to "
     "<latents>/features/<name>)"),
    # A stray RANK=1 in the shell (no torchrun) made rank 1 of a world of 1: it wrote nothing and exited 0.
    # (A case may return (argv, environment variables).)
    ("env-stray-rank-train", lambda w, m: (_train(w), {"RANK": "1"}),
     "masked-dit train: error: the environment says RANK=1 of WORLD_SIZE=1: RANK must be in [0, WORLD_SIZE) "
     "(unset RANK and WORLD_SIZE for one process, or launch with torchrun)"),
    ("env-stray-rank-sample", lambda w, m: (_sample(w, m), {"RANK": "1", "WORLD_SIZE": "1"}),
     "masked-dit sample: error: the environment says RANK=1 of WORLD_SIZE=1: RANK must be in [0, WORLD_SIZE) "
     "(unset RANK and WORLD_SIZE for one process, or launch with torchrun)"),
    # were a ZeroDivisionError traceback, and int()'s message without the variable's name
    ("env-world-size-zero", lambda w, m: (_train(w), {"WORLD_SIZE": "0"}),
     "masked-dit train: error: the environment says RANK=0 of WORLD_SIZE=0: RANK must be in [0, WORLD_SIZE) "
     "(unset RANK and WORLD_SIZE for one process, or launch with torchrun)"),
    ("env-world-size-not-int", lambda w, m: (_sample(w, m), {"WORLD_SIZE": "abc"}),
     "masked-dit sample: error: environment variable WORLD_SIZE='abc' is not an integer"),
]


def _without_checkpoints(work, m):
    """A copy of the module's run in ``work/runs`` with its checkpoints removed (an export, no checkpoint)."""
    shutil.copytree(m / "runs" / "digits-dit", work / "runs" / "digits-dit")
    shutil.rmtree(work / "runs" / "digits-dit" / "checkpoints")
    return work


def _log_only(work):
    """A run folder as a kill before the first checkpoint leaves it: a metrics record, nothing else."""
    (work / "runs" / "digits-dit").mkdir(parents=True)
    (work / "runs" / "digits-dit" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return work


def _edited_meta(work, m, text):
    """A copy of the module's run without its export, whose checkpoint's meta.json holds ``text``."""
    shutil.copytree(m / "runs" / "digits-dit", work / "run")
    shutil.rmtree(work / "run" / "export")
    (work / "run" / "checkpoints" / "step_00000001" / "meta.json").write_text(text)
    return work / "run" / "checkpoints" / "step_00000001"


def _apply(path, fn):
    fn(path)
    return path.parent if path.suffix == ".npy" else path


def _unlink(path):
    path.unlink()
    return path.parent


def _copy(src, dst):
    shutil.copy(src, dst)
    return dst


def _torch_saved(work, m):
    """The module's DiT export as a torch.save file."""
    from safetensors.torch import load_file

    torch.save(load_file(m / "runs/digits-dit/export/ema.safetensors"), work / "e.pt")
    return work / "e.pt"


def _broken_images(work):
    root = _images(work / "broken")
    (root / "a" / "0.png").write_bytes(b"not a png")
    return root


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, material, tmp_path, capsys, monkeypatch):
    name, setup, expected = case
    work = tmp_path / "work"
    work.mkdir()
    argv = setup(work, material)
    if isinstance(argv, tuple):
        argv, env = argv
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    before_material, before_work = _tree(material), _tree(work)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    expected = expected.replace("{work}", str(work)).replace("{m}", str(material))
    assert "\n" not in err and "Traceback" not in err, err
    if expected.endswith("..."):
        assert err.startswith(expected[:-3]), err
    else:
        assert err == expected
    assert _tree(material) == before_material, "the shared material was modified"
    changed = {p for p, v in before_work.items() if _tree(work).get(p) != v}
    assert not changed, f"written over: {changed}"


def test_override_without_value_is_argparse_error(capsys):
    """``--train.steps`` with nothing after it: the error says how to write it."""
    for argv in (["train", "--train.steps"], ["train", "--train.steps", "--run.name=x"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "masked-dit: error: override --train.steps needs a value: --train.steps=VALUE")


def test_override_with_a_space_is_taken_as_with_equals(capsys):
    """``--train.steps 3 --run.name x`` (argparse style) resolves like ``--train.steps=3 --run.name=x``."""
    assert main(["train", "--train.steps", "3", "--optim.lr", "2e-4", "--print-config"]) == 0
    spaced = capsys.readouterr().out
    assert main(["train", "--train.steps=3", "--optim.lr=2e-4", "--print-config"]) == 0
    assert capsys.readouterr().out == spaced
    assert '"steps": 3' in spaced


def test_unknown_option_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "masked-dit: error: unrecognized arguments: --bogus"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_image_modes_are_converted(tmp_path, mode):
    """Grayscale, alpha, palette and CMYK images are read as RGB (as ADM's loader does), not rejected."""
    from masked_dit.data import ImageFolderDataset

    ds = ImageFolderDataset(str(_images(tmp_path / "imgs", mode=mode)), 16)
    item = ds[0]
    assert item["x"].shape == (3, 16, 16) and item["x"].abs().max() <= 1


def test_load_official_names_the_mismatch(material):
    from masked_dit.models import load_official

    path = material / "runs/digits-dit/export/ema.safetensors"
    with pytest.raises(ValueError, match=r"does not fit DiT-S/2: .*pos_embed"):
        load_official(path, "DiT-S/2", in_channels=1, num_classes=10, depth=2, hidden_size=32, num_heads=2,
                      patch_size=2, input_size=16)


def test_docs_list_every_case():
    """docs/errors.md's tables and CASES name the same cases (a message changed in one place only would
    leave the docs wrong)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    documented = re.findall(r"^\| `([a-z][a-z0-9-]+)`", doc, re.M)  # rows of other tests start with their option
    assert sorted(documented) == sorted(c[0] for c in CASES)
