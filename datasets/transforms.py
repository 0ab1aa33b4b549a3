"""OpenCLIP's image transforms, with ``data.augment`` taking OpenCLIP's aug-cfg keys.

Train: ``RandomResizedCrop(scale=(0.9, 1.0))`` with bicubic interpolation, RGB, optional color
jitter / grayscale, tensor, normalize with the model's mean/std. ``use_timm: true`` builds timm's
``create_transform`` (RandAugment-style options, random erasing ``re_prob``). Val: resize the
shortest side (bicubic), center crop, tensor, normalize.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchvision import transforms as T

from cadenza.models.clip import OPENAI_MEAN, OPENAI_STD


def _to_rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


def image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = OPENAI_MEAN,
    std: Sequence[float] = OPENAI_STD,
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] | None = None,
    color_jitter: float | Sequence[float] | None = None,
    color_jitter_prob: float | None = None,
    gray_scale_prob: float | None = None,
    re_prob: float | None = None,
    re_count: int | None = None,
    use_timm: bool = False,
) -> Callable[[Any], Any]:
    """Build the PIL → normalized tensor transform (the keyword arguments are ``data.augment``)."""
    normalize = T.Normalize(mean=list(mean), std=list(std))
    if not train:
        return T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                _to_rgb,
                T.ToTensor(),
                normalize,
            ]
        )
    if use_timm:
        from timm.data import create_transform

        options = {"scale": tuple(scale), "ratio": tuple(ratio) if ratio else None, "color_jitter": color_jitter}
        options.update({"re_prob": re_prob or 0.0, "re_count": re_count or 1})
        return create_transform(
            input_size=(3, image_size, image_size),
            is_training=True,
            hflip=0.0,
            mean=tuple(mean),
            std=tuple(std),
            re_mode="pixel",
            interpolation="bicubic",
            **{k: v for k, v in options.items() if v is not None},
        )
    if re_prob or re_count:
        raise ValueError("re_prob / re_count need use_timm: true (as in OpenCLIP)")
    steps: list[Callable] = [
        T.RandomResizedCrop(
            image_size,
            scale=tuple(scale),
            ratio=tuple(ratio) if ratio else (3 / 4, 4 / 3),
            interpolation=T.InterpolationMode.BICUBIC,
        ),
        _to_rgb,
    ]
    if color_jitter_prob:
        if color_jitter is None or isinstance(color_jitter, (int, float)) or len(color_jitter) != 4:
            raise ValueError("color_jitter_prob needs color_jitter as 4 numbers: brightness, contrast, saturation, hue")
        steps.append(T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_prob))
    elif color_jitter is not None:
        raise ValueError("color_jitter without use_timm needs color_jitter_prob (as in OpenCLIP)")
    if gray_scale_prob:
        steps.append(T.RandomGrayscale(p=gray_scale_prob))
    steps += [T.ToTensor(), normalize]
    return T.Compose(steps)
