"""The central table: one tiny setting per registered algorithm, used by the generic tests.

A registered algorithm without an entry here fails ``test_every_algorithm_has_an_entry``.
"""

from __future__ import annotations

ALGORITHM_SETTINGS: dict[str, dict] = {
    "clipa": {"image_scale": 0.5, "text_length": 4, "text_mask": "block", "finetune_fraction": 0.4},
    "distillation": {"teacher": "tiny-vit", "weight": 0.5},
    "ema": {"half_life": "2ba", "start": "1ba"},
    "grad_checkpointing": {},
    "gradient_clipping": {"norm": 0.5},
    "lock_image": {"unlocked_groups": 1, "freeze_bn_stats": True},
    "lock_text": {"unlocked_layers": 2, "freeze_layer_norm": False},
    "lora": {"rank": 2, "alpha": 4, "dropout": 0.1, "target": ["image", "text"], "modules": ["attn.qkv", "mlp.c_fc"]},
    "patch_dropout": {"prob": 0.5},
    "progressive_resizing": {"initial_scale": 0.5, "delay_fraction": 0.3, "finetune_fraction": 0.3, "mode": "crop"},
    "text_token_reduction": {"length": 4, "mode": "random"},
    "torch_compile": {"backend": "aot_eager"},
}
