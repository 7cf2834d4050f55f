"""Load official checkpoints as published into our models.

Formats handled (whichever the file is):
  * plain state dicts (DiT ``DiT-XL-2-256x256.pt``, SiT ``SiT-XL-2-256x256.pt``, MDT),
  * training dicts ``{'ema', 'model', 'opt', 'args', ...}`` (MaskDiT, REPA, some MDT): ``'ema'``
    is preferred, as the official sampling scripts do, then ``'model'``, then ``'state_dict'``,
  * ``.safetensors`` files,
  * REPA's legacy layout (``decoder_blocks.i`` after ``encoder_depth`` blocks), renumbered as its
    ``generate.py --legacy`` does,
  * key prefixes from wrappers (``module.`` from DDP, ``_orig_mod.`` from torch.compile, MaskDiT's
    ``model.`` from its EDM wrapper) are matched against the target model's own keys.
"""
from __future__ import annotations

import argparse
import os
import pickle

import torch
import torch.nn as nn

from masked_dit.models.registry import MODEL_CONFIGS, build_model, check_model_name

_PREFERRED = ("ema", "model", "state_dict", "module")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


#################################################################################
#                              Reading the file                                 #
#################################################################################

_ZIP_MAGIC = b"PK\x03\x04"


def _unsupported_global(message: str) -> str:
    """The line of torch's weights_only refusal that names the class ('Unsupported global: GLOBAL x.Y'),
    without its terminal colour codes; else its first line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", message)
    named = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    return f"unsupported global {named.group(1)}" if named else (text.strip().splitlines() or [""])[0]


def _torch_load(path: str, weights_only: bool, is_zip: bool):
    # A zip archive is memory-mapped: a training dict (model, EMA, optimizer state: ~11 GB at XL) is
    # not read into RAM on every rank to keep its EMA. torch's legacy format cannot be mapped.
    kw = dict(map_location="cpu", mmap=is_zip)
    if not weights_only:
        return torch.load(path, weights_only=False, **kw)
    # Training checkpoints often carry argparse Namespaces ('args'): harmless, allow them.
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe is not None:
            with safe([argparse.Namespace]):
                return torch.load(path, weights_only=True, **kw)
        return torch.load(path, weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: checkpoint holds objects beyond tensors ({_unsupported_global(str(e))}); if you "
                         f"trust the file, load it in Python with weights_only=False (load_official, "
                         f"read_checkpoint), or re-save its state dict alone") from None


def _torch_save_format(path: str) -> str:
    """'zip' (torch.save's archive), 'pickle' (its legacy format: protocol byte 0x80); else a ValueError."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        if not zipfile.is_zipfile(path):  # the directory sits at the end: an interrupted download or copy
            raise ValueError("a torch.save zip archive without its central directory: the file is truncated or "
                             "damaged (re-download or re-save it)")
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    raise ValueError("neither a torch.save zip archive nor a legacy pickle")


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True) -> dict:
    """The dict inside a checkpoint file (.safetensors or torch.save), as stored; one-line errors."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path)
        else:
            obj = _torch_load(path, weights_only, _torch_save_format(path) == "zip")
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files raise many types
        if isinstance(exc, ValueError) and str(exc).startswith(path):
            raise
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {detail})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a dict holding one, got {type(obj).__name__}")
    return obj


def pick_weights(obj: dict, path, prefer=_PREFERRED) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself when it holds tensors, else its first ``prefer`` entry."""
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in prefer:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            raise ValueError(f"{os.fspath(path)}: no weights found; top-level keys are {sorted(map(str, obj))} "
                             f"(expected tensors or one of {list(prefer)})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def saved_model_name(path: str | os.PathLike) -> str | None:
    """The model name our exports record in their safetensors metadata (``{'model': 'DiT-S/2'}``), or None."""
    if not os.fspath(path).endswith(".safetensors"):
        return None
    from safetensors import safe_open

    with safe_open(os.fspath(path), "pt") as f:
        return (f.metadata() or {}).get("model")


def load_official_state_dict(path: str | os.PathLike, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """The model weights inside an official checkpoint file (EMA weights when present)."""
    return pick_weights(read_checkpoint(path, weights_only), path)


#################################################################################
#                         Matching keys to our model                            #
#################################################################################

def _match_prefixes(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strips (or adds) wrapper prefixes so that the checkpoint's keys best match ``target_keys``."""
    best, best_hits = state, len(target_keys & state.keys())
    candidates = [state]
    cur = state
    for _ in range(3):  # strip up to three stacked wrapper prefixes (e.g. module._orig_mod.model.)
        for p in _WRAPPER_PREFIXES:
            if cur and all(k.startswith(p) for k in cur):
                cur = {k[len(p):]: v for k, v in cur.items()}
                candidates.append(cur)
                break
        else:
            break
    for p in _WRAPPER_PREFIXES:  # our model may itself be a wrapper (e.g. keys under `model.`)
        candidates.append({p + k: v for k, v in cur.items()})
    for cand in candidates:
        hits = len(target_keys & cand.keys())
        if hits > best_hits:
            best, best_hits = cand, hits
    return best


def _repa_legacy_blocks(state: dict[str, torch.Tensor], encoder_depth: int) -> dict[str, torch.Tensor]:
    """REPA's legacy checkpoints split the stack into ``blocks`` (the first ``encoder_depth``) and
    ``decoder_blocks``; REPA's own ``generate.py --legacy`` (utils.load_legacy_checkpoints) renumbers
    ``decoder_blocks.i`` as ``blocks.(i + encoder_depth)``. The same here, so such files load too."""
    if not any(k.startswith("decoder_blocks.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        if k.startswith("decoder_blocks."):
            _, idx, rest = k.split(".", 2)
            k = f"blocks.{int(idx) + encoder_depth}.{rest}"
        out[k] = v
    return out


def _fmt(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raises one ValueError listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            problems.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:8])}"
                            + (f"; ... ({len(shapes) - 8} more)" if len(shapes) > 8 else ""))
        raise ValueError(f"{what} does not fit {getattr(model, 'name', type(model).__name__)}: " + " | ".join(problems))


#################################################################################
#                      Arguments the checkpoint's shapes fix                    #
#################################################################################

def _count(state: dict, prefix: str) -> int:
    """Entries of the ModuleList whose keys start with ``prefix`` (``'de_blocks.'``)."""
    idx = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    return 1 + max((int(i) for i in idx if i.isdigit()), default=-1)


def _saved_arg(args, key: str):
    """A training argument saved in the checkpoint (an argparse Namespace or a dict), or None."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return args.get(key) if isinstance(args, dict) else None


def infer_kwargs(state: dict[str, torch.Tensor], family: str, config: dict, args=None) -> dict:
    """Constructor arguments that the weights (keys already matched to ours) or the checkpoint's
    saved ``args`` determine and the registered name does not: input channels, learn_sigma, the
    number of classes, REPA's projector widths, encoder depth and qk_norm, MDTv2's depth and decoder
    depth, MaskDiT's decoder. A checkpoint trained with any of them changed then loads by its name alone."""
    pre = "model." if family == "maskdit" else ""
    get = lambda key: state.get(pre + key)  # noqa: E731
    out, patch = {}, config.get("patch_size", 2)
    if (w := get("x_embedder.proj.weight")) is not None and w.dim() == 4:
        out["in_channels"] = w.shape[1]
        if (f := get("final_layer.linear.weight")) is not None and f.shape[0] in (patch * patch * w.shape[1] * k
                                                                                   for k in (1, 2)):
            out["learn_sigma"] = f.shape[0] == 2 * patch * patch * w.shape[1]
    if family == "maskdit":
        table = get("y_embedder.embedding_table.weight")  # a Linear over one-hot labels: [D, num_classes]
        out["num_classes"] = 0 if table is None else table.shape[1]
        out["use_decoder"] = get("decoder_pos_embed") is not None
        if out["use_decoder"]:
            out["decoder_hidden_size"] = get("decoder_pos_embed").shape[-1]
            out["decoder_depth"] = _count(state, pre + "decoder_blocks.")
            if get("mask_token") is None:  # trained (or fine-tuned) without the MAE branch
                out["mae_loss_coef"] = 0.0
    elif (table := get("y_embedder.embedding_table.weight")) is not None:
        classes, dropout = config.get("num_classes", 1000), config.get("class_dropout_prob", 0.1)
        rows, saved = table.shape[0], _saved_arg(args, "num_classes")  # DiT / SiT / REPA save their args
        if ("num_classes" not in config and type(saved) is int and saved != classes  # noqa: E721 (not bool)
                and rows in (saved, saved + 1)):
            # the table alone cannot tell 10 classes from 9 + the null row: the run's own count can
            out["num_classes"] = classes = saved
        if rows == classes and dropout > 0:  # no null row: trained without label dropout
            out["class_dropout_prob"] = 0.0
        elif rows != classes + (dropout > 0):
            out["num_classes"] = rows - (dropout > 0)
    heads = [state.get(f"projectors.{i}.4.weight") for i in range(_count(state, "projectors."))]
    if family == "repa_sit" and heads and all(h is not None for h in heads) and "projectors.0.0.weight" in state:
        out["projector_dim"] = state["projectors.0.0.weight"].shape[0]
        out["z_dims"] = [h.shape[0] for h in heads]
        if any(k.startswith("decoder_blocks.") for k in state):  # legacy layout: the encoder is `blocks`
            out["encoder_depth"] = _count(state, "blocks.")
        elif isinstance(depth := _saved_arg(args, "encoder_depth"), int):  # REPA's train.py saves its args
            out["encoder_depth"] = depth
    if family in ("dit", "sit", "repa_sit") and any(k.endswith(".attn.q_norm.weight") for k in state):
        out["qk_norm"] = True  # REPA's --qk-norm
    # MDTv2 layout: either list may be empty (decode_layer 0, or depth == decode_layer), not both
    if family == "mdtv2" and (_count(state, "en_inblocks.") or _count(state, "de_blocks.")):
        out["decode_layer"] = _count(state, "de_blocks.")
        # and its depth: the official constructor builds (depth - decode_layer) // 2 blocks per encoder
        # half, so a run with an odd difference (e.g. depth 12, decode_layer 3) saved depth - 1 blocks
        out["depth"] = 2 * _count(state, "en_inblocks.") + out["decode_layer"]
    return out


#################################################################################
#                                 Public API                                    #
#################################################################################

class ModelArgumentError(TypeError, ValueError):
    """Constructor arguments a model cannot be built with. A TypeError, as an unknown argument is, so
    that callers which know where the arguments came from (``sample --model-kwargs``) say so; a
    ValueError (one line) for the others."""


def error_line(exc: BaseException, limit: int = 200) -> str:
    """``exc``'s first line, cut to ``limit`` characters (a value echoed back may be long)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line if len(line) <= limit else line[:limit] + "..."


def _build(name: str, given: dict, **kwargs) -> nn.Module:
    try:
        return build_model(name, **kwargs)
    except TypeError as exc:  # an argument the constructor does not take: the message names it
        raise ModelArgumentError(error_line(exc)) from None
    except (ValueError, RuntimeError) as exc:  # e.g. a negative or fractional width: name what was given
        args = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ModelArgumentError(f"with {args or 'its registered arguments'}: {type(exc).__name__}: "
                                 f"{error_line(exc)}") from None


def _build_error(name: str, kwargs: dict) -> str | None:
    """Why ``name`` cannot be built with ``kwargs`` (the constructor's first line), or None if it can."""
    try:
        with torch.device("meta"):
            build_model(name, **kwargs)
        return None
    except (TypeError, ValueError, RuntimeError) as exc:
        return error_line(exc)


def load_official(path: str | os.PathLike, name: str, *, weights_only: bool = True, **overrides) -> nn.Module:
    """Builds the registered model ``name`` (``'DiT-XL/2'``, ``'SiT-XL/2'``, ``'REPA-SiT-XL/2'``,
    ``'MDTv2-XL/2'``, ...), loads the official checkpoint at ``path`` strictly and returns it in
    eval mode on the CPU. ``overrides`` go to the constructor. What the checkpoint itself fixes
    (``input_size`` from ``pos_embed``, and :func:`infer_kwargs`) is read from it when not given, so
    512px DiT, a 10-class SiT or a REPA run with a DINOv2-L target need nothing extra."""
    return load_official_with_args(path, name, weights_only=weights_only, **overrides)[0]


def load_official_with_args(path: str | os.PathLike, name: str, *, weights_only: bool = True,
                            **overrides) -> tuple[nn.Module, object]:
    """:func:`load_official`, and the training arguments the file saved (``'args'``: an argparse
    Namespace or a dict; None for a bare state dict), e.g. for :func:`saved_transport`."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODEL_CONFIGS))}")
    raw = read_checkpoint(path, weights_only)
    # our exports name their model: another family's weights can fit key for key and be sampled wrongly
    check_model_name(saved_model_name(path), name, f"checkpoint {os.fspath(path)}", same_family=True)
    state = pick_weights(raw, path)
    family, config = MODEL_CONFIGS[name]
    given = dict(overrides)
    if "input_size" not in overrides:
        pos = next((v for k, v in state.items() if k.split(".")[-1] == "pos_embed" and v.dim() == 3), None)
        patch = overrides.get("patch_size", config.get("patch_size"))
        if pos is not None and patch:
            side = int(round(pos.shape[1] ** 0.5))
            if side * side == pos.shape[1]:
                overrides["input_size"] = side * patch
    with torch.device("meta"):  # the registered configuration: its keys place the wrapper prefixes
        state = _match_prefixes(state, set(build_model(name).state_dict().keys()))
    inferred = infer_kwargs(state, family, {**config, **given}, raw.get("args"))
    overrides.update({k: v for k, v in inferred.items() if k not in given})
    if family == "repa_sit":
        state = _repa_legacy_blocks(state, overrides.get("encoder_depth", config.get("encoder_depth", 8)))
    with torch.device("meta"):
        try:
            shell = _build(name, given, **overrides)
        except ModelArgumentError:
            if _build_error(name, given) is not None:  # what was given fails: say so as before
                raise
            # the file is another model's: name the values read off it that alone stop the build
            read = {k: v for k, v in overrides.items() if k not in given}
            culprits = {k: v for k, v in read.items()
                        if _build_error(name, {o: w for o, w in overrides.items() if o != k}) is None} or read
            raise ValueError(f"checkpoint {os.fspath(path)} does not fit {name}: its weights give "
                             f"{', '.join(f'{k}={v!r}' for k, v in culprits.items())}, which {name} cannot be built "
                             f"with ({_build_error(name, overrides)})") from None
    shell.name = name
    check_state_dict(shell, state, what=f"checkpoint {os.fspath(path)}")
    model = _build(name, given, **overrides)
    model.load_state_dict(state, strict=True)
    model.name = name
    return model.eval(), raw.get("args")


def saved_transport(args, family: str, path) -> dict:
    """The ``ObjectiveConfig`` fields that a SiT or REPA training checkpoint's saved ``args`` fix, to sample
    it as trained: SiT's ``train.py`` saves ``path_type`` (Linear / GVP / VP), ``prediction`` and its time
    cut-offs, REPA's ``path_type`` (linear / cosine). Empty for other families and for bare state dicts."""
    from masked_dit.diffusion.repa import sit_path_name
    from masked_dit.diffusion.transport import PATHS, PREDICTIONS

    if family not in ("sit", "repa_sit"):
        return {}
    out = {}
    path_type = _saved_arg(args, "path_type")
    if path_type is not None:
        try:  # REPA saves its own names (linear / cosine): SiT's here; sit_path_name refuses others
            known = sit_path_name(path_type) if family == "repa_sit" else path_type if path_type in PATHS else None
        except ValueError:
            known = None
        if known is None:
            raise ValueError(f"checkpoint {os.fspath(path)}: its saved args.path_type={path_type!r} is not a "
                             f"{'SiT' if family == 'sit' else 'REPA'} path")
        out["path_type"] = known
    if family == "sit":
        prediction = _saved_arg(args, "prediction")
        if prediction is not None:
            if prediction not in PREDICTIONS:
                raise ValueError(f"checkpoint {os.fspath(path)}: its saved args.prediction={prediction!r} is not "
                                 f"one of {PREDICTIONS}")
            out["prediction"] = prediction
        if out.get("path_type") == "VP" or out.get("prediction", "velocity") != "velocity":
            for key in ("train_eps", "sample_eps"):  # read by SiT only there
                value = _saved_arg(args, key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out[key] = float(value)
    return out
