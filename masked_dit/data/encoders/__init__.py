"""Frozen pretrained vision encoders for REPA's representation alignment.

REPA (sihyun-yu/REPA) aligns projector outputs to the patch features of a frozen encoder. Per
training step it preprocesses the raw uint8 images of side R (``preprocess_raw_image``) and reads
the encoder out (train.py:295-304). What it does per ``--enc-type`` family, read at REPA commit
67f7145 (utils.py ``load_encoders``, train.py, models/*.py):

  family  sizes (z_dim)        input at R=256           mean/std  tokens REPA keeps           final norm
  dinov2  s b l g (384..1536)  bicubic 224 (1)          ImageNet  x_norm_patchtokens          yes
  dinov2reg  same, 4 registers  "                       ImageNet  x_norm_patchtokens          yes
  dinov1  b (768)              raw 256, no resize (2)   ImageNet  patch tokens (3)            yes (3)
  clip    L (1024)             bicubic 224 (4)          CLIP      transformer out [:, 1:]     no (ln_pre only)
  mocov3  s b l (384/768/1024) raw 256, no resize (2)   ImageNet  forward_features[:, 1:]     yes
  mae     l (1024)             raw 256, no resize (2)   ImageNet  blocks out [:, 1:]          no
  jepa    h (1280)             bicubic 224 (5)          ImageNet  all tokens (no CLS)         yes

  (1) train.py:48-51: /255, Normalize, interpolate(224 * (R // 256), 'bicubic'); position table
      resampled once to 16 * (R // 256) (utils.py:95-98, timm ``resample_abs_pos_embed``:
      bicubic, antialiased). Patch 14: 16x16 tokens at 224.
  (2) train.py:45-47, 52-54: /255, Normalize, no resize: the 256 px images go in as they are.
      Patch 16, so 16x16 tokens; the 14x14 position tables of the 224 px checkpoints are
      resampled to 16x16 at load (utils.py:46-49 MoCo v3, 108-111 DINOv1, 136-144 MAE).
      REPA runs these three (and CLIP, I-JEPA) at R=256 only (utils.py:61-65).
  (3) REPA's models/dinov1.py is not in its repository (utils.py:105 imports it; the output is
      used as is, train.py:301). We take DINO's final-LayerNorm patch tokens, CLS dropped.
  (4) train.py:41-44: /255, interpolate(224 * (R // 256), 'bicubic'), then Normalize with CLIP's
      mean/std (resize before normalise). models/clip_vit.py:213-230: conv1, CLS, positions,
      ln_pre, transformer, CLS dropped, no ln_post and no projection. Patch 14, native 16x16.
  (5) train.py:55-58 as DINOv2; models/jepa.py:448-471: patches + sin-cos positions (no CLS),
      blocks, final norm; ViT-H/14 at 224 (utils.py:146-156): native 16x16, no resampling.
  MoCo v3 (utils.py:69-86, 27-50, train.py:302): timm ViT, checkpoint ``state_dict`` keys under
  ``module.base_encoder.`` without head/fc, RCG's misnamed blocks 13/14 fixed. MAE (utils.py:129-144,
  models/mae_vit.py:34-48): timm ViT-L/16, forward_features drops CLS, skips the final norm.

The encoders here are the same networks through transformers (hub ids or local save_pretrained
folders) or timm: DINOv2 ``Dinov2Model`` / timm ``vit_*_patch14_dinov2``, DINOv1 ``ViTModel``
(facebook/dino-vitb16), CLIP ``CLIPVisionModel`` (openai/clip-vit-large-patch14, its
``last_hidden_state`` has no post-LayerNorm), MAE ``ViTMAEModel`` (facebook/vit-mae-large, with
mask_ratio 0, order-keeping noise and the final norm removed), I-JEPA ``IJepaModel``
(facebook/ijepa_vith14_1k), MoCo v3 from its checkpoint file into a timm ``VisionTransformer``.
REPA names force the original models' LayerNorm eps 1e-6 on DINOv1, MAE and I-JEPA hub configs.

    load_encoder(spec)          -> PatchEncoder: normalised pixels [B,3,S,S] -> tokens [B, T_enc, z_dim]
    preprocess_images(images)   -> REPA's preprocessing (uint8 or [-1, 1] floats in)
    resample_token_grid(z, g)   -> encoder tokens on the diffusion model's g x g token grid
    EncoderFeatures(encoders)   -> the callable REPAObjective takes (``encoder=``): batch -> zs
    extract_encoder_features()  -> the same features cached beside extracted VAE latents
    LatentsWithFeatures(...)    -> LatentDataset items plus the cached ``'zs'``

Spec forms accepted by ``load_encoder`` (and ``--objective.encoder``, ``extract-features --encoder``):

    dinov2-vit-b, dinov2reg-vit-l       REPA's names: dinov2(reg)-vit-{s,b,l,g}, dinov1-vit-b, clip-vit-L,
    clip-vit-L, mae-vit-l, jepa-vit-h   mocov3-vit-{s,b,l}, mae-vit-l, jepa-vit-h (hub ids as above)
    mocov3-vit-b                        MoCo v3 from REPA's place, ckpts/mocov3_vitb.pth (or weights=<file>)
    mocov3-vit-b:/ckpt/vit-b-300ep.pth.tar   NAME:PATH: REPA's recipe on a local checkpoint file (MoCo v3)
    clip-vit-L:/models/clip-vit-large   ... or a local transformers folder (every other family)
    facebook/dinov2-base                a Hugging Face hub id (transformers; family from model_type)
    /path/to/folder                     a local folder holding config.json (transformers)
    vit_base_patch14_dinov2.lvd142m     a timm name (also "timm/<name>" or "timm:<name>");
                                        ``weights=`` may name a local checkpoint file for it
"""
from masked_dit.data.encoders.backbones import (MOCOV3_HEADS, PatchEncoder, load_encoder, mocov3_backbone_state,
                                                resample_pos_embed)
from masked_dit.data.encoders.cache import (FEATURES_DIR, EncoderFeatureDataset, LatentsWithFeatures,
                                            extract_encoder_features, feature_dir_name)
from masked_dit.data.encoders.features import (EncoderFeatures, load_encoder_features, preprocess_images,
                                               resample_token_grid)
from masked_dit.data.encoders.specs import (CLIP_DEFAULT_MEAN, CLIP_DEFAULT_STD, DINOV2_SIZES, FAMILIES,
                                            IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, REPA_NAMES, EncoderSpec,
                                            Family, encoder_family, encoder_z_dim, parse_encoder_spec,
                                            repa_encoder_image_size, resolve_encoder)

__all__ = [
    "CLIP_DEFAULT_MEAN", "CLIP_DEFAULT_STD", "DINOV2_SIZES", "FAMILIES", "FEATURES_DIR", "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD", "MOCOV3_HEADS", "REPA_NAMES", "EncoderFeatureDataset", "EncoderFeatures", "EncoderSpec",
    "Family", "LatentsWithFeatures", "PatchEncoder", "encoder_family", "encoder_z_dim", "extract_encoder_features",
    "feature_dir_name", "load_encoder", "load_encoder_features", "mocov3_backbone_state", "parse_encoder_spec",
    "preprocess_images", "repa_encoder_image_size", "resample_pos_embed", "resample_token_grid", "resolve_encoder",
]
