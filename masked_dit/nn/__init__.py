"""Building blocks shared by every model family."""
from masked_dit.nn.block import (Attention, FinalLayer, FusedDiTBlock, Mlp, RelativePositionBias, apply_pending,
                                 init_dit_weights, run_blocks)
from masked_dit.nn.embed import (LabelEmbedder, OneHotLabelEmbedder, PatchEmbed, TimestepEmbedder, check_labels,
                                 check_model_inputs, sincos_pos_embed_2d, timestep_embedding, unpatchify)

__all__ = [
    "Attention", "FinalLayer", "FusedDiTBlock", "LabelEmbedder", "Mlp", "OneHotLabelEmbedder", "PatchEmbed",
    "RelativePositionBias", "TimestepEmbedder", "apply_pending", "check_labels", "check_model_inputs",
    "init_dit_weights", "run_blocks", "sincos_pos_embed_2d", "timestep_embedding", "unpatchify",
]
