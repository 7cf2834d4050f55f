import json

import pytest

from masked_dit.configs import PRESETS, Config, ConfigError, apply_overrides, get_preset
from masked_dit.train.build import build_model_from_config, model_kwargs


def test_every_preset_resolves_and_names_a_model():
    for name in PRESETS:
        cfg = get_preset(name)
        assert cfg.preset == name and cfg.run.name == name
        model_name, kw = model_kwargs(cfg)  # family/objective agree, registry knows the name
        assert model_name == cfg.model.name


def test_paper_recipes():
    mdt = get_preset("imagenet256-mdtv2-xl2")
    assert (mdt.optim.name, mdt.optim.lr, tuple(mdt.optim.betas), mdt.optim.grad_clip) == ("adan", 3e-4, (0.98, 0.92, 0.99), 1.0)
    assert mdt.train.global_batch == 256 and mdt.objective.min_snr_gamma == 5.0
    mask = get_preset("imagenet256-maskdit-xl2")
    assert (mask.train.global_batch, mask.objective.mask_ratio, mask.objective.mae_loss_coef) == (1024, 0.5, 0.1)
    unmask = get_preset("imagenet256-maskdit-xl2-unmask")
    assert (unmask.objective.mask_ratio, unmask.optim.lr) == (0.0, 5e-5)
    repa = get_preset("imagenet256-repa-sit-xl2")
    assert repa.objective.proj_coeff == 0.5 and repa.model.extra["encoder_depth"] == 8
    assert get_preset("imagenet256-dit-xl2").optim.lr == 1e-4
    # flips: DiT, SiT and MDT flip images (before the VAE); MaskDiT (train.xflip False) and REPA do not
    flips = {name: get_preset(name).data.random_flip for name in PRESETS if name.startswith("imagenet256")}
    assert flips == {"imagenet256-dit-xl2": True, "imagenet256-sit-xl2": True, "imagenet256-mdtv2-xl2": True,
                     "imagenet256-repa-sit-xl2": False, "imagenet256-maskdit-xl2": False,
                     "imagenet256-maskdit-xl2-unmask": False, "imagenet256-maskdit-xl2-unmask-cos": False}
    assert get_preset().preset == "digits-mdtv2"


def test_paper_recipes_precision_and_flips():
    """As each official loop: REPA under mixed precision (accelerate fp16 -> bf16 here), MDT in fp32 without
    TF32 matmuls (its train_util sets no flag), DiT / SiT fp32 with TF32 (flips: test_paper_recipes)."""
    repa = get_preset("imagenet256-repa-sit-xl2")
    assert (repa.parallel.precision, repa.parallel.tf32, repa.data.random_flip) == ("bf16", True, False)
    # MaskDiT: configs/train/imagenet256-latent.yaml tf32 False, amp True (fp16 -> bf16);
    # configs/finetune/imagenet256-latent-cos.yaml tf32 True, amp False
    maskdit = get_preset("imagenet256-maskdit-xl2")
    assert (maskdit.parallel.precision, maskdit.parallel.tf32) == ("bf16", False)
    cos = get_preset("imagenet256-maskdit-xl2-unmask-cos")
    assert (cos.parallel.precision, cos.parallel.tf32) == ("fp32", True)
    mdt = get_preset("imagenet256-mdtv2-xl2")
    assert (mdt.parallel.precision, mdt.parallel.tf32, mdt.data.random_flip) == ("fp32", False, True)
    for name in ("imagenet256-dit-xl2", "imagenet256-sit-xl2"):
        cfg = get_preset(name)
        assert (cfg.parallel.precision, cfg.parallel.tf32, cfg.data.random_flip, cfg.optim.grad_clip) == \
            ("fp32", True, True, 0.0), name


def test_overrides_types_and_roundtrip(tmp_path):
    cfg = apply_overrides(get_preset("digits-dit"), ["--optim.lr=3e-4", "--train.steps=1_000", "--parallel.compile=true",
                                                     "--model.extra={\"mlp_ratio\": 2.0}", "--run.resume=none",
                                                     "--optim.betas=0.9,0.95"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 1000 and cfg.parallel.compile is True
    assert cfg.model.extra == {"mlp_ratio": 2.0} and cfg.run.resume is None and cfg.optim.betas == (0.9, 0.95)
    cfg.save(tmp_path / "config.json")
    again = Config.load(tmp_path / "config.json")
    assert again.to_dict() == cfg.to_dict()
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 3e-4


@pytest.mark.parametrize("override, message", [
    ("--optim.nme=adan", "unknown key --optim.nme; valid keys of optim: name, lr"),
    ("--optm.lr=1", "unknown config section 'optm'; valid: run, model"),
    ("--optim.name=sgd", "choose one of: adamw, adan"),
    ("--train.steps=1.5", "--train.steps='1.5' is not a valid int"),
    ("--train.steps=0", "--train.steps must be > 0"),
    ("--parallel.mode=tp", "choose one of: ddp, fsdp"),
    ("--optim.betas=0.9,0.9", "needs 3 values for adan"),
    ("train.steps=3", "overrides look like --section.key=value"),
    ("--objective.weighting=sigmoid", "choose one of: uniform, lognormal"),
    ("--data.min_image_size=-1", "--data.min_image_size must be >= 0, or none for --data.image_size"),
    # were an OverflowError traceback (int(inf))
    ("--train.steps=inf", "--train.steps='inf' is not a valid int"),
    ("--train.global_batch=1e400", "--train.global_batch='1e400' is not a valid int"),
    # were accepted: a negative or NaN MFU in metrics.jsonl (NaN is not JSON), 0 silently meant "unset"
    ("--train.peak_tflops=-5", "--train.peak_tflops must be a finite number > 0 (the GPU's peak, for MFU)"),
    ("--train.peak_tflops=nan", "--train.peak_tflops must be a finite number > 0"),
    ("--train.peak_tflops=0", "--train.peak_tflops must be a finite number > 0"),
    # were accepted: every step non-finite (skipped), or a loss term with its sign flipped
    ("--objective.sigma_data=0", "--objective.sigma_data must be a finite number > 0 (got 0.0)"),
    ("--objective.proj_coeff=nan", "--objective.proj_coeff must be a finite number >= 0 (got nan)"),
    ("--objective.mae_loss_coef=-0.1", "--objective.mae_loss_coef must be a finite number >= 0"),
    ("--objective.min_snr_gamma=0", "--objective.min_snr_gamma must be a finite number > 0"),
    ("--objective.P_std=-1", "--objective.P_std must be a finite number >= 0"),
    ("--objective.P_mean=inf", "--objective.P_mean must be a finite number (got inf)"),
])
def test_bad_overrides_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset(), [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_repa_path_and_weighting_reach_model_and_objective():
    cfg = apply_overrides(get_preset("digits-repa-sit"), ["--objective.path_type=GVP", "--objective.weighting=lognormal"])
    assert model_kwargs(cfg)[1]["path_type"] == "cosine"
    with pytest.raises(ConfigError, match="--objective.path_type=VP is not one of REPA's paths"):
        apply_overrides(get_preset("digits-repa-sit"), ["--objective.path_type=VP"])


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="valid: imagenet256-dit-xl2"):
        get_preset("imagenet")


def test_family_objective_mismatch_is_explained():
    cfg = apply_overrides(get_preset("digits-dit"), ["--objective.kind=edm_maskdit"])
    with pytest.raises(ValueError, match="use --objective.kind=adm"):
        build_model_from_config(cfg)


def test_compile_mode_is_validated_and_reaches_every_block(monkeypatch):
    import torch

    from masked_dit.configs import CHOICES
    from masked_dit.train import parallel

    assert CHOICES[("parallel", "compile_mode")] == parallel.COMPILE_MODES
    with pytest.raises(ConfigError, match=r"--parallel.compile_mode='reduce-overhead' is not valid; choose one of: "
                                          r"default, max-autotune-no-cudagraphs"):
        apply_overrides(get_preset("digits-dit"), ["--parallel.compile_mode=reduce-overhead"])
    cfg = apply_overrides(get_preset("digits-dit"), ["--parallel.compile=true",
                                                     "--parallel.compile_mode=max-autotune-no-cudagraphs"])
    model = build_model_from_config(cfg)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    parallel.parallelize(model, cfg, type("World", (), {"distributed": False})())
    assert seen and all(kw == {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"} for kw in seen)
    assert len(seen) == len(parallel.transformer_blocks(model))
    seen.clear()
    parallel.apply_compile(model, "aot_eager", "max-autotune-no-cudagraphs")  # other backends take no mode
    assert all(kw == {"backend": "aot_eager"} for kw in seen)
    with pytest.raises(ValueError, match="compile mode 'turbo' is not valid"):
        parallel.apply_compile(model, mode="turbo")


def test_maskdit_sampler_options_roundtrip_with_an_unbounded_churn_window(tmp_path):
    """EDM's S_max defaults to inf (no upper bound): it survives config.json, and overrides parse it."""
    cfg = apply_overrides(get_preset("digits-maskdit"), ["--sample.S_churn=40", "--sample.S_min=0.05",
                                                         "--sample.discretization=iddpm", "--sample.sigma_max=none"])
    assert cfg.sample.S_max == float("inf") and cfg.sample.sigma_max is None
    cfg.save(tmp_path / "config.json")
    back = Config.load(tmp_path / "config.json")
    assert back.sample == cfg.sample
    assert apply_overrides(cfg, ["--sample.S_max=inf", "--sample.S_max=50"]).sample.S_max == 50.0
    with pytest.raises(ConfigError, match=r"^--sample.schedule='cosine' is not valid; choose one of: linear, vp, ve$"):
        apply_overrides(cfg, ["--sample.schedule=cosine"])


def test_unconditional_maskdit_refuses_guided_grids_before_training():
    """The presets guide their grids (cfg_scale 1.5-4): with num_classes=0 that failed at the first grid,
    after the training steps had run. Now the config says so up front; cfg_scale 1 trains."""
    base = get_preset("digits-maskdit")
    with pytest.raises(ConfigError, match=r"^--sample.cfg_scale=4.0 guides with class labels, which an "
                                          r"unconditional MaskDiT \(--model.num_classes=0\) lacks"):
        apply_overrides(base, ["--model.num_classes=0"])
    assert apply_overrides(base, ["--model.num_classes=0", "--sample.cfg_scale=1"]).model.num_classes == 0


def test_sit_time_cutoffs_reach_the_transport_where_sit_reads_them():
    """SiT's --train-eps / --sample-eps: a VP (or noise / score) model's [eps, 1 - eps]; refused where SiT
    would ignore them (Linear / GVP velocity) and on other objectives."""
    from masked_dit.diffusion.objectives import build_objective

    cfg = apply_overrides(get_preset("digits-sit"), ["--objective.path_type=VP", "--objective.train_eps=0.002"])
    transport = build_objective(cfg.objective).transport
    assert (transport.train_eps, transport.sample_eps) == (0.002, 1e-3)  # the other keeps SiT's default
    cfg = apply_overrides(get_preset("digits-sit"), ["--objective.prediction=noise", "--objective.sample_eps=0.01"])
    assert build_objective(cfg.objective).transport.sample_eps == 0.01
    assert build_objective(get_preset("digits-sit").objective).transport.train_eps == 0.0
    bad = [(["--objective.train_eps=0.001"], r"^--objective.train_eps=0.001 is not read for a Linear velocity model"),
           (["--objective.path_type=VP", "--objective.sample_eps=0.5"],
            r"^--objective.sample_eps must be a finite number in \[0, 0.5\) \(got 0.5\)$"),
           (["--objective.path_type=VP", "--objective.train_eps=nan"], r"^--objective.train_eps must be a finite"),
           (["--objective.kind=adm", "--objective.train_eps=0.001"],
            r"^--objective.train_eps=0.001 is SiT's time cut-off: it applies to --objective.kind=transport only")]
    for overrides, message in bad:
        with pytest.raises(ConfigError, match=message):
            apply_overrides(get_preset("digits-sit"), overrides)


def test_maskdit_mask_ratio_schedule_settings():
    cfg = get_preset("imagenet256-maskdit-xl2-unmask-cos")
    assert (cfg.objective.mask_ratio, cfg.objective.mask_ratio_fn, cfg.objective.mask_ratio_min) == (0.5, "cosine4", 0)
    with pytest.raises(ConfigError, match=r"^--objective.mask_ratio_min must be in \[0, --objective.mask_ratio=0.5\]"):
        apply_overrides(get_preset("digits-maskdit"), ["--objective.mask_ratio_fn=linear", "--objective.mask_ratio_min=0.7"])


def test_a_batch_geometry_error_is_said_by_rank_0_only(tmp_path, monkeypatch, capsys):
    """It is the same on every torchrun rank: eight ranks printed the same line eight times."""
    from masked_dit.cli import main

    argv = ["train", "--preset", "digits-dit", "--train.global_batch=8", "--train.micro_batch=3",
            f"--run.out_dir={tmp_path}", "--train.device=cpu"]
    assert main(argv) == 2
    assert "--train.global_batch=8 must be a multiple of micro_batch (3)" in capsys.readouterr().err
    # Rank 1 of 2 as torchrun starts it (a RANK without WORLD_SIZE is a stray, said by itself), without
    # the process group the check comes before.
    from masked_dit.train import trainer
    from masked_dit.train.dist import World

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer, "init_world", lambda device="auto": World(rank=1, local_rank=1, size=2))
    assert main(argv) == 2 and capsys.readouterr().err == ""


def test_integer_overrides_are_exact():
    """Integers went through float: 9999999999999999999999 became 10**22 (and 2**53 + 1 lost its 1);
    "1e6" and "1_000" still read as integers."""
    cfg = apply_overrides(get_preset(), ["--train.steps=9999999999999999999999", "--train.sample_every=9007199254740993",
                                         "--train.log_every=1e6", "--train.ckpt_every=1_000"])
    assert cfg.train.steps == 9999999999999999999999 and cfg.train.sample_every == 2 ** 53 + 1
    assert cfg.train.log_every == 1_000_000 and cfg.train.ckpt_every == 1000
    with pytest.raises(ConfigError):
        apply_overrides(get_preset(), ["--train.steps=2.5"])


def test_text_fields_refuse_json_null_and_objects():
    """{"run": {"name": null}} in a config file made a run folder called 'None'."""
    for value in (None, [1], {"a": 1}, True):
        with pytest.raises(ConfigError, match=r"^--run.name=.* is not a valid str$"):
            Config.from_dict({"run": {"name": value}})
    assert Config.from_dict({"run": {"name": "x"}, "model": {"name": "DiT-S/2"}}).run.name == "x"


def test_imagenet_recipes_load_batches_in_worker_processes():
    """With no worker the host loads each batch between GPU steps (a REPA batch: ~0.1 s, CPU-measured)."""
    from masked_dit.configs.presets import PRESETS, get_preset

    names = [n for n in PRESETS if n.startswith("imagenet")]
    assert names and all(get_preset(n).data.num_workers == 4 for n in names)
