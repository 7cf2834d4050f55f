"""The training loop: config -> run folder with checkpoints, metrics, samples and an EMA export.

    from masked_dit.configs import get_preset
    from masked_dit.train import train
    train(get_preset("digits-mdtv2"))

Single process or torchrun (one process per GPU). Parallelism lives in ``parallel.parallelize``;
this file only runs steps. Run folder ``<out_dir>/<name>/``::

    config.json        the resolved config
    metrics.jsonl      one record per log point (loss terms, grad norm, lr, img/s, TFLOP/s, MFU, memory)
    checkpoints/       DCP checkpoints (the last ``keep_last``)
    samples/           grids during training;  samples.png: the final grid (EMA weights)
    export/            ema.safetensors + config.json (loadable with masked_dit.models.load_official)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from masked_dit.configs import FAMILY_SAMPLE_KEYS, Config, ConfigError, validate
from masked_dit.data import BatchStream, build_dataset, sample_posterior
from masked_dit.diffusion.objectives import backward_by_pass, build_objective, unwrap
from masked_dit.rng import derived_seed
from masked_dit.train import checkpoint as ckpt
from masked_dit.train.build import build_model_from_config, check_sampler, model_kwargs
from masked_dit.train.dist import World, init_world, shutdown
from masked_dit.train.lock import hold_folder
from masked_dit.train.ema import EMA
from masked_dit.train.grid import fixed_noise, grid_labels, save_grid
from masked_dit.train.metrics import MetricsLog, format_record, peak_flops, training_flops_per_image
from masked_dit.train.optim import build_optimizer, clip_eps, grad_norm_and_clip, lr_at, use_fused
from masked_dit.train.parallel import parallelize, set_gradient_sync
from masked_dit.train.signals import Preempted, StopRequest


#################################################################################
#                                  Helpers                                      #
#################################################################################

class NonFiniteError(FloatingPointError):
    """``train.max_nonfinite_steps`` steps in a row had a non-finite loss or gradient (one-line message)."""


def batch_sizes(cfg: Config, world: World) -> tuple[int, int]:
    """(micro_batch per rank, accumulation steps) so that micro * accum * world == global_batch."""
    tc = cfg.train
    micro = tc.micro_batch or tc.global_batch // world.size
    if micro <= 0 or micro * world.size > tc.global_batch or tc.global_batch % (micro * world.size):
        raise ConfigError(f"--train.global_batch={tc.global_batch} must be a multiple of micro_batch ({micro}) x "
                          f"world size ({world.size})")  # the same on every rank: said once
    return micro, tc.global_batch // (micro * world.size)


def _to_device(batch: dict, device) -> dict:
    """The batch on ``device``, floating tensors widened to float32 there (fp16 latent and feature
    shards cross the workers and the host-to-device copy at half the bytes; the widening is exact)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device, non_blocking=True)
        return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = move(v)
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
            out[k] = [move(t) for t in v]
        else:
            out[k] = v
    return out


def autocast_context(cfg: Config, world: World, fsdp_mp: bool):
    if cfg.parallel.precision == "bf16" and not fsdp_mp:
        return torch.autocast(world.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


#################################################################################
#                                  Trainer                                      #
#################################################################################

class Trainer:
    def __init__(self, cfg: Config, world: World | None = None):
        validate(cfg)
        self.cfg = cfg
        self.world = world or init_world(cfg.train.device)
        w = self.world
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.ckpt_dir = self.run_dir / "checkpoints"
        # One training per run folder: the checks below cannot see one that has not written yet, and a
        # second one (a job re-launched while the first lingers) would destroy the first's checkpoints.
        locked = w.is_main and self.run_dir.is_dir()
        if locked:  # an existing folder: locked before anything is read from it
            self._hold_run_folder()
        resume_arg = cfg.run.resume
        if resume_arg is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume_arg = "latest"  # torchrun restarted the workers after a failure: continue, do not start over
        found = ckpt.list_checkpoints(self.ckpt_dir)
        if resume_arg is None and found:
            # Starting over here would prune (keep_last) and overwrite the earlier run's checkpoints.
            raise ValueError(f"run folder {self.run_dir} already has checkpoints (newest: {found[-1].name}); pass "
                             f"--resume latest to continue it, or another --run.name / --run.out_dir to start anew")
        if not found:
            # A finished run whose checkpoints were removed (to save disk) keeps its export and log: a
            # start from step 0 would replace them. A resume after a crash before the first checkpoint
            # (torchrun's restart) has no export and starts over as before.
            names = ["export/ema.safetensors"] + (["metrics.jsonl"] if resume_arg is None else [])
            earlier = next((name for name in names if (self.run_dir / name).exists()), None)
            if earlier:
                again = " (--resume latest starts it over there)" if earlier == "metrics.jsonl" else ""
                raise ValueError(f"run folder {self.run_dir} holds an earlier run's {earlier} but no checkpoint to "
                                 f"continue from; starting at step 0 would replace it: choose another --run.name / "
                                 f"--run.out_dir, or remove the folder{again}")
        if cfg.parallel.tf32 and w.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        # Data first: its errors (missing folder, shape mismatch) are the most common.
        self.dataset = build_dataset(cfg.data, cfg.model)
        self.micro_batch, self.accum = batch_sizes(cfg, w)

        # Same initial weights on every rank (seeded identically), then per-rank streams.
        torch.manual_seed(cfg.run.seed)
        self.model_name, self.model_kwargs = model_kwargs(cfg)
        check_sampler(cfg)
        module = build_model_from_config(cfg).to(w.device)
        resume = ckpt.resolve_resume(resume_arg, self.ckpt_dir, w.size)
        init_ema = None
        if cfg.run.init_from and resume is None:  # a resumed fine-tune continues from its own checkpoint
            from masked_dit.train.warm_start import initial_weights

            init_model, init_ema = initial_weights(cfg.run.init_from, module, self.model_name)
            module.load_state_dict(init_model)
            self._log(f"weights from {cfg.run.init_from} (optimizer, step and data start fresh)")
        pixel = cfg.data.source != "latents"
        self.objective = build_objective(cfg.objective, module, pixel_space=pixel,  # loads REPA's DINOv2 if named
                                         image_size=cfg.data.image_size if pixel else None,
                                         precision=cfg.parallel.precision)
        self.flops_per_image = training_flops_per_image(module, cfg.objective)
        self._flops_by_kept: dict[int, float | None] = {}
        self.model = parallelize(module, cfg, w)
        self.module = unwrap(self.model)
        self.fsdp_mp = cfg.parallel.mode == "fsdp" and w.distributed
        self.ema = EMA(self.module, cfg.optim.ema_decay)
        if init_ema is not None:
            from masked_dit.train.warm_start import load_into_ema

            load_into_ema(self.ema, init_ema)
        self.optimizer = build_optimizer(self.module.parameters(), cfg.optim,
                                         fused=use_fused(cfg.optim.name, w.device.type, self.fsdp_mp))
        # per-rank draws (t, noise, masks, dropout)
        torch.manual_seed(derived_seed(cfg.run.seed * 100_003 + w.rank))
        self.step = 0
        data_state = metrics_window = None
        self.nonfinite_streak = self.nonfinite_total = 0  # skipped (non-finite) steps: in a row, in all
        self.resumed_step = None
        self.sample_owed = False  # a stop signal at a grid step checkpointed it before its grid ran
        self.stop = StopRequest()  # the signal handlers are installed by fit()
        self.stop_signum = None  # a stop signal every rank has agreed on (see _agree)
        if resume is not None:
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            extra = ckpt.load_checkpoint(resume, self.module, self.optimizer, self.ema, w, model_name=self.model_name)
            # the saved param_groups came back with the state: this run's --optim.* values win (its
            # config.json says so), as lr's schedule does; a change is said once
            changed = sorted({k for g, c in zip(self.optimizer.param_groups, configured) for k in c
                              if k != "lr" and g.get(k) != c[k]})
            for group, values in zip(self.optimizer.param_groups, configured):
                group.update(values)
            if changed:
                self._log(f"optimizer {', '.join(changed)}: this run's settings, not the checkpoint's")
            if extra.pop("rng_restored", True) is False:
                # Another world size: this rank's saved stream cannot be reused. Still seeded with the
                # step: reseeding as at step 0 would replay the first steps' noise, timesteps, masks and
                # label dropout on every rank (rank r of the new world draws what rank r drew at step 0).
                torch.manual_seed(derived_seed((cfg.run.seed * 100_003 + w.rank) * 1_000_003 + extra["step"]))
            self.resumed_step = extra["step"]
            self.nonfinite_total = extra.get("nonfinite_steps", 0)
            self.sample_owed = bool(extra.get("sample_owed", False))
            self.step = extra["step"]
            data_state = extra.get("data")
            metrics_window = extra.get("metrics")
            self._log(f"resumed from {resume} at step {self.step}")
            if self.step > cfg.train.steps:  # ended at once without a word: the run is past the asked end
                self._log(f"warning: step {self.step} is past --train.steps={cfg.train.steps}: nothing to train; "
                          f"the final outputs are made from this checkpoint")
        elif cfg.run.resume and cfg.run.resume != "latest":
            raise ValueError(f"--run.resume={cfg.run.resume}: no checkpoint found")
        self.stream = BatchStream(self.dataset, self.micro_batch, rank=w.rank, world=w.size, accum=self.accum,
                                  seed=cfg.run.seed, random_flip=cfg.data.random_flip,
                                  num_workers=cfg.data.num_workers, state=data_state)
        if w.is_main and not locked:  # a new folder: locked before the first write
            self._hold_run_folder()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.flops_per_image,
                                  peak_flops(w.device, cfg.train.peak_tflops),
                                  tensorboard_dir=self.run_dir / "tensorboard" if w.is_main else None)
        self.metrics.load_state_dict(metrics_window)  # a log window open at the checkpoint goes on
        if w.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume is not None:
                self._say_config_changes(self.run_dir / "config.json")
            cfg.save(self.run_dir / "config.json")
            # steps past the checkpoint are about to be re-done; a finished run re-evaluates its end, and
            # an owed grid step re-makes its digits record (a run killed after making it wrote one already)
            self.metrics.truncate_after(self.step,
                                        evaluations_at_step=self.step < cfg.train.steps and not self.sample_owed)

    # ------------------------------------------------------------------ logging
    def _log(self, msg: str) -> None:
        if self.world.is_main:
            try:
                from tqdm import tqdm
                tqdm.write(msg, file=sys.stderr)
            except ImportError:
                print(msg, file=sys.stderr)

    # -------------------------------------------------------------------- step
    def train_step(self) -> dict:
        cfg, w = self.cfg, self.world
        lr = lr_at(self.step, cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if hasattr(self.objective, "progress"):  # MaskDiT's mask-ratio schedule: a function of the step
            self.objective.progress = self.step / cfg.train.steps
        self.model.train()
        sums: dict[str, torch.Tensor] = {}  # loss terms stay on the device: no sync between micro-steps
        for micro in range(self.accum):
            last = micro == self.accum - 1
            batch = sample_posterior(_to_device(next(self.stream), w.device), cfg.data.latent_scale)
            # MDTv2: full then masked pass, each backpropagated before the next runs; DDP reduces in the
            # backward of a forward run with sync on: the micro-step's last pass only
            terms = backward_by_pass(self.objective, self.model, batch,
                                     lambda last_pass, last=last: self._pass_context(last and last_pass),
                                     divide_by=self.accum)
            for k, v in terms.items():
                term = v.float() / self.accum
                sums[k] = sums[k] + term if k in sums else term
        # the norm before clipping, clipped by the optimizer's rule (clip_eps)
        sums["grad_norm"] = grad_norm_and_clip(list(self.module.parameters()), cfg.optim.grad_clip,
                                               clip_eps(cfg.optim))
        totals, finite = self._agree(sums)  # the step's one host sync: the skip decision needs the values
        if not finite:
            return self._skip_step(totals)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.step += 1
        self.nonfinite_streak = 0
        totals["lr"] = lr
        return totals

    def _step_flops_per_image(self) -> float | None:
        """The last step's model FLOPs per image where they vary with it (MaskDiT's scheduled mask ratio,
        one count per keep count), else None (the run's)."""
        objective = self.objective
        if getattr(objective, "mask_ratio_fn", "constant") == "constant" or self.flops_per_image is None:
            return None
        from masked_dit.nn.masking import keep_count

        ratio = objective.current_mask_ratio()
        kept = keep_count(self.module.model.num_patches, ratio)
        if kept not in self._flops_by_kept:
            self._flops_by_kept[kept] = training_flops_per_image(self.module, self.cfg.objective, mask_ratio=ratio)
        return self._flops_by_kept[kept]

    def _pass_context(self, sync: bool) -> contextlib.ExitStack:
        """Gradient sync on or off, and the run's autocast, around one forward + backward."""
        stack = contextlib.ExitStack()
        stack.enter_context(set_gradient_sync(self.model, sync))
        stack.enter_context(autocast_context(self.cfg, self.world, self.fsdp_mp))
        return stack

    def _agree(self, sums: dict) -> tuple[dict, bool]:
        """This rank's step values as floats, and whether the loss terms and the gradient norm are
        finite on every rank; sets ``stop_signum`` when any rank got a stop signal. All ranks must skip
        and stop at the same step, or the next step's collectives would not match: when distributed,
        one MAX all-reduce of [non-finite here, signal] computed on the device, read with the values
        in one host sync."""
        values = torch.stack([v.to(self.world.device).reshape(()) for v in sums.values()])
        signum = self.stop.signum or 0
        if self.world.distributed:
            flags = torch.stack([(~torch.isfinite(values)).any().to(values.dtype),
                                 torch.full((), float(signum), dtype=values.dtype, device=values.device)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            *floats, nonfinite, signum = torch.cat([values, flags]).tolist()
            finite, signum = nonfinite == 0.0, int(signum)
        else:
            floats = values.tolist()
            finite = all(math.isfinite(v) for v in floats)
        if signum and self.stop_signum is None:
            self.stop_signum = signum
        return dict(zip(sums, floats)), finite

    def _skip_step(self, totals: dict) -> dict:
        """A non-finite step: gradients dropped, no optimizer or EMA update (the step still counts,
        so the data and LR schedule move on); logged, and fatal after max_nonfinite_steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        limit = self.cfg.train.max_nonfinite_steps
        self._log(f"step {self.step}: non-finite loss or gradient (loss {totals.get('loss')}, grad_norm "
                  f"{totals.get('grad_norm')}): update skipped ({self.nonfinite_streak} in a row; stop at {limit})")
        if self.nonfinite_streak >= limit:
            found = ckpt.list_checkpoints(self.ckpt_dir)
            kept = f"last good checkpoint: {found[-1]}" if found else "no checkpoint was written"
            raise NonFiniteError(f"stopped at step {self.step}: {self.nonfinite_streak} consecutive steps had a "
                                 f"non-finite loss or gradient (--train.max_nonfinite_steps={limit}); {kept}")
        return {"skipped": 1.0}

    # ------------------------------------------------------------------ outputs
    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.module, self.optimizer, self.ema, self.world,
                                    {"data": self.stream.state_dict(), "nonfinite_steps": self.nonfinite_total,
                                     "metrics": self.metrics.state_dict(), "sample_owed": self.sample_owed},
                                    keep_last=self.cfg.train.keep_last,
                                    model_name=self.model_name)

    def ema_model(self) -> torch.nn.Module | None:
        """An unsharded copy of the model with the EMA weights (rank 0; collective under FSDP)."""
        full = self.ema.full_state_dict(self.module)
        if not self.world.is_main:
            return None
        model = build_model_from_config(self.cfg)
        model.load_state_dict(full, strict=True)
        return model.to(self.world.device).eval()

    def _training_rng_kept(self):
        """A context whose draws leave the training RNG (CPU and this rank's GPU) as it was: what runs
        between steps must not move it, or a resumed run would draw other noise than one run."""
        w = self.world
        return torch.random.fork_rng(devices=[w.device.index or 0] if w.device.type == "cuda" else [])

    def _sample(self, model, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Samples for labels ``y`` from fixed noise, without moving the training RNG."""
        cfg, w = self.cfg, self.world
        sc = cfg.sample
        shape = (len(y), cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        noise = fixed_noise(shape, seed).to(w.device)
        with self._training_rng_kept():
            torch.manual_seed(seed)
            return self.objective.sample(model, noise, y, sampler=sc.sampler, steps=sc.steps, cfg_scale=sc.cfg_scale,
                                         scale_pow=sc.scale_pow, guidance_low=sc.guidance_low,
                                         guidance_high=sc.guidance_high,
                                         **{k: getattr(sc, k) for k in FAMILY_SAMPLE_KEYS.get(cfg.objective.kind, ())})

    def sample_grid(self, path: Path, model) -> None:
        """Saves the grid of ``model`` (from :meth:`ema_model`, which every rank must call; None off rank 0)."""
        cfg, w = self.cfg, self.world
        if model is None:
            return
        sc = cfg.sample
        y = grid_labels(cfg.model.num_classes, sc.num_per_class, sc.grid_classes).to(w.device)
        x = self._sample(model, y, sc.seed)
        if cfg.data.source == "latents":
            x = x / cfg.data.latent_scale / 4  # a rough view of the latent channels
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(x, y.cpu(), path, per_row=sc.num_per_class)

    def evaluate_digits(self, model) -> dict | None:
        """The offline digits metric (conditional accuracy, classifier-feature FD) of the EMA
        ``model`` on ``sample.eval_num`` samples with balanced labels; written to metrics.jsonl."""
        cfg, w = self.cfg, self.world
        # (conditional accuracy needs a class-conditional model: not MaskDiT's unconditional num_classes=0)
        if cfg.data.source != "digits" or cfg.sample.eval_num < 2 or model is None or cfg.model.num_classes == 0:
            return None
        from masked_dit.eval.digits import score_digits

        n = cfg.sample.eval_num
        y = torch.arange(n, device=w.device) % cfg.model.num_classes
        x = self._sample(model, y, cfg.sample.seed + 1)  # not the grid's noise
        record = {"step": self.step, **score_digits(x, y).as_dict()}
        self.metrics.write(record)
        self._log(f"step {self.step}: digits conditional accuracy {record['digits_cond_acc']:.3f}, "
                  f"feature FD {record['digits_fd']:.2f} ({n} EMA samples)")
        return record

    def _stop_on_signal(self, bar) -> None:
        """After the step in flight: checkpoint (the open log window goes into it; not during a non-finite
        streak, which makes the newest checkpoint the last good one) and raise Preempted."""
        if bar is not None:
            bar.close()
        # the step's grid and digits record are owed: the resumed run makes them first (same EMA, same noise)
        self.sample_owed = self.step % self.cfg.train.sample_every == 0
        if self.nonfinite_streak == 0:
            self.save()
        found = ckpt.list_checkpoints(self.ckpt_dir)
        where = f"checkpoint {found[-1]}" if found else "no checkpoint (non-finite steps from the start)"
        raise Preempted(f"stopped by {StopRequest.name(self.stop_signum)} at step {self.step} of "
                        f"{self.cfg.train.steps}: {where}; continue with --resume latest", self.stop_signum)

    def _hold_run_folder(self) -> None:
        hold_folder(self.run_dir, self, "run folder", "wait for that training to end (or stop it), or use another "
                                                      "--run.name / --run.out_dir")

    def _say_config_changes(self, saved: Path) -> None:
        """A resumed run takes this command line's settings; where they differ from the run's saved
        config.json (e.g. a bare `--resume latest` after a run started with overrides), it says which."""
        from masked_dit.configs import config_changes

        try:
            # as saved (tuples are JSON lists)
            changes = config_changes(json.loads(saved.read_text()), json.loads(json.dumps(self.cfg.to_dict())))
        except (OSError, ValueError, AttributeError):  # no readable config.json: nothing to compare
            return
        if changes:
            shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
            self._log(f"warning: resumed with settings other than {saved}'s: {shown}; this run's apply (pass the "
                      f"run's own options to continue it unchanged)")

    def export(self) -> Path | None:
        full = self.ema.full_state_dict(self.module)
        if not self.world.is_main:
            return None
        return ckpt.export_ema(self.run_dir / "export", full, self.model_name, self.model_kwargs, self.cfg.to_dict(),
                               step=self.step)

    # -------------------------------------------------------------------- loop
    def _periodic_samples(self) -> None:
        """This step's grid and digits record; under a forked RNG, since the EMA copy's and the digits
        classifier's random init draw too (a resumed run must draw what one run draws)."""
        with self._training_rng_kept():
            model = self.ema_model()
            self.sample_grid(self.run_dir / "samples" / f"step_{self.step:08d}.png", model)
            self.evaluate_digits(model)

    def _steps(self, bar, stop_at: int | None) -> dict | None:
        """Steps to ``train.steps`` (or ``stop_at``) with logs, checkpoints and grids; the last record."""
        cfg, w = self.cfg, self.world
        tc = cfg.train
        last = None
        if self.sample_owed:  # preempted at a grid step: its grid and digits record, as one run makes them
            with self.metrics.paused():
                self._periodic_samples()
            self.sample_owed = False
        while self.step < tc.steps and (stop_at is None or self.step < stop_at):
            values = self.train_step()
            skipped = "skipped" in values  # a non-finite step: nothing to average into the log
            if not skipped:
                self.metrics.add(values, self.micro_batch * self.accum, self._step_flops_per_image())
            if bar is not None:
                bar.update(1)
                if not skipped:
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                extra = {"nonfinite_steps": self.nonfinite_total} if self.nonfinite_total else {}
                last = self.metrics.flush(self.step, w, extra)
                if last is not None:
                    self._log(format_record(last))
            if self.stop_signum is not None and self.step < tc.steps:
                self._stop_on_signal(bar)  # saves and raises: no grid now, the deadline is near
            if self.step % tc.sample_every == 0 and self.step < tc.steps:
                with self.metrics.paused():  # not training time: out of img/s and MFU
                    self._periodic_samples()  # before this step's checkpoint: a kill in between re-does both
            # No checkpoint during a non-finite streak: the newest one stays the last good step.
            if self.step % tc.ckpt_every == 0 and self.step < tc.steps and self.nonfinite_streak == 0:
                with self.metrics.paused():
                    self.save()
        return last

    def fit(self, stop_at: int | None = None) -> dict:
        """Trains to ``train.steps``; ``stop_at`` ends early without final outputs (as if killed)."""
        cfg, w = self.cfg, self.world
        tc = cfg.train
        bar = None
        if w.is_main and tc.progress and self.step < tc.steps:
            from tqdm import tqdm
            bar = tqdm(total=tc.steps, initial=self.step, desc=cfg.run.name, dynamic_ncols=True, file=sys.stderr)
        self.metrics.reset_clock()
        with self.stop:  # SIGTERM / SIGINT / SIGUSR1: checkpoint at the end of the step (see signals.py)
            last = self._steps(bar, stop_at)
        if stop_at is not None and self.step >= stop_at:
            if bar is not None:
                bar.close()
            return {"step": self.step, "last": last, "stopped": True}
        if bar is not None:
            bar.close()
        if self.step != self.resumed_step:  # re-running a finished run: its final checkpoint is there already
            self.save()
        export = self.export()
        model = self.ema_model()
        self.sample_grid(self.run_dir / "samples.png", model)
        evaluation = self.evaluate_digits(model)
        if w.is_main and (self.run_dir / "metrics.jsonl").is_file():  # none when nothing was logged
            from masked_dit.eval.plots import plot_run

            plot_run(self.run_dir)  # loss_curves.png, metric_curves.png
        if self.nonfinite_total == self.step:  # fewer steps than max_nonfinite_steps, every one skipped
            self._log(f"warning: all {self.step} steps had a non-finite loss or gradient and were skipped: the "
                      f"weights are the initial ones")
        self._log(f"done: {self.run_dir}")
        return {"step": self.step, "last": last, "export": str(export) if export else None, "eval": evaluation,
                "run_dir": str(self.run_dir) if w.is_main else None}


def train(cfg: Config, stop_at: int | None = None) -> dict:
    """Runs a whole training (see ``Trainer``); tears the process group down if it made one."""
    trainer = Trainer(cfg)
    try:
        return trainer.fit(stop_at=stop_at)
    finally:
        trainer.stream.close()  # the DataLoader workers ignore SIGTERM: stop them here, whatever happened
        shutdown(trainer.world)
