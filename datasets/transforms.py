"""OpenCLIP's image transforms, with ``data.augment`` taking OpenCLIP's aug-cfg keys.

Train: ``RandomResizedCrop(scale=(0.9, 1.0))`` with bicubic interpolation, RGB, optional color
jitter / grayscale, tensor, normalize with the model's mean/std. ``use_timm: true`` builds timm's
``create_transform`` (RandAugment-style options, random erasing ``re_prob``) as OpenCLIP calls it: colour jitter only
when ``color_jitter`` is set (timm's own default would add 0.4). Val: resize the
shortest side (bicubic), center crop, tensor, normalize.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

from cadenza.models.clip import OPENAI_MEAN, OPENAI_STD


def _to_rgb(image):
    return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image


class ToNormalizedTensor:
    """``ToTensor`` then ``Normalize(mean, std)`` in one pass: PIL image → contiguous ``(C, H, W)`` float32.

    ``pixel * (1 / (255 * std)) - mean / std`` on the image's bytes: the same numbers within float32
    rounding (tested against OpenCLIP's transforms), in two array ops instead of a dozen. Small images go
    through NumPy, whose per-call cost is a fraction of torch's (24 instead of 61 µs at 32 px on a 2-core
    EPYC); from ``SMALL`` pixels on, torch's strided kernels are faster (190 instead of 237 µs at 224 px).
    Images that are not RGB are converted first (OpenCLIP's ``_convert_to_rgb``), except small grayscale ones,
    whose one channel is broadcast to the three: the same numbers, without the conversion.
    """

    SMALL = 128 * 128

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(-1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(-1, 1, 1)
        self._scale, self._shift = self.scale.numpy(), self.shift.numpy()

    def __call__(self, image) -> torch.Tensor:
        width, height = image.size
        small = width * height < self.SMALL
        if image.mode != "RGB" and not (small and image.mode == "L"):
            image = image.convert("RGB")  # OpenCLIP's _convert_to_rgb
        data = image.tobytes()
        if small:  # a grayscale image broadcasts over the 3 channels: what converting it to RGB first gives
            pixels = np.frombuffer(data, np.uint8).reshape(height, width, -1).transpose(2, 0, 1)  # (1 | 3, H, W)
            out = np.empty((3, height, width), np.float32)
            np.multiply(pixels, self._scale, out=out)
            out += self._shift
            return torch.from_numpy(out)
        pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        pixels = pixels.view(height, width, 3).permute(2, 0, 1)  # (C, H, W) view
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(self.scale).add_(self.shift)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={list(self.mean)}, std={list(self.std)})"


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's ``RandomResizedCrop`` (PIL images), its crop drawn from Python's ``random``.

    The draw is torchvision's ``get_params`` (10 tries of an area uniform in ``scale`` and a log-uniform
    aspect ``ratio``, a uniform position; the central crop when none fits), the same distribution, with
    ``random.random`` in place of four torch calls a try: a crop costs about 6 instead of 25 µs, and on 32 px
    images scale 0.9-1 rejects about 2 of 3 tries (the crop draw was a sixth of the quickstart loader's
    worker). Cadenza seeds ``random`` per sample, as it seeds torch's generator (``samples.seeded_rng``),
    so crops are reproducible as before; torch's generator is left untouched. Tensors go to torchvision.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))

    def crop_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of the crop, as ``T.RandomResizedCrop.get_params`` returns it."""
        area, uniform, randrange = height * width, random.uniform, random.randrange
        (scale_lo, scale_hi), (ratio_lo, ratio_hi) = self.scale, self._log_ratio
        for _ in range(10):
            target_area = area * uniform(scale_lo, scale_hi)
            aspect_ratio = math.exp(uniform(ratio_lo, ratio_hi))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return randrange(height - h + 1), randrange(width - w + 1), h, w
        in_ratio = width / height  # no crop fits: the central crop, as torchvision falls back
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img):  # a transform has no hooks: skip nn.Module's call machinery (a few µs a sample)
        return self.forward(img)

    def forward(self, img):
        if isinstance(img, torch.Tensor):
            return super().forward(img)
        i, j, h, w = self.crop_params(*img.size)
        img = img.crop((j, i, j + w, i + h))  # what F.resized_crop does to a PIL image, without its checks
        height, width = self.size
        if (h, w) == (height, width):
            return img
        return img.resize((width, height), F.pil_modes_mapping[self.interpolation])


def check_augment(
    scale: Sequence[float] = (0.9, 1.0),
    ratio: Sequence[float] | None = None,
    color_jitter: float | Sequence[float] | None = None,
    color_jitter_prob: float | None = None,
    gray_scale_prob: float | None = None,
    re_prob: float | None = None,
    re_count: int | None = None,
    use_timm: bool = False,
) -> None:
    """Raise ``ValueError`` for ``data.augment`` values out of range or options that do not go together
    (``load_config`` checks them with this, ``image_transform`` too: no transform is built just to find out)."""
    for name, pair, top in (("scale", scale, 1.0), ("ratio", ratio, math.inf)):
        if pair is not None and (len(pair) != 2 or not 0 < pair[0] <= pair[1] <= top):
            raise ValueError(f"{name} must be two numbers 0 < low <= high{' <= 1' if top == 1 else ''}, got {pair}")
    for name, p in (
        ("color_jitter_prob", color_jitter_prob),
        ("gray_scale_prob", gray_scale_prob),
        ("re_prob", re_prob),
    ):
        if p is not None and not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    if use_timm:
        if color_jitter_prob or gray_scale_prob:
            raise ValueError(
                "color_jitter_prob / gray_scale_prob are not used with use_timm: true (OpenCLIP drops them): remove "
                "them, or set use_timm: false"
            )
        return
    if re_prob or re_count:
        raise ValueError("re_prob / re_count need use_timm: true (as in OpenCLIP)")
    if color_jitter_prob:
        if color_jitter is None or isinstance(color_jitter, (int, float)) or len(color_jitter) != 4:
            raise ValueError("color_jitter_prob needs color_jitter as 4 numbers: brightness, contrast, saturation, hue")
    elif color_jitter is not None:
        raise ValueError("color_jitter without use_timm needs color_jitter_prob (as in OpenCLIP)")


#: ``data.augment``'s keys and defaults, as plain data (what a config holds; reinforced datasets store them)
AUGMENT_DEFAULTS: dict[str, Any] = {
    name: list(parameter.default) if isinstance(parameter.default, tuple) else parameter.default
    for name, parameter in inspect.signature(check_augment).parameters.items()
}


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
    check_augment(scale, ratio, color_jitter, color_jitter_prob, gray_scale_prob, re_prob, re_count, use_timm)
    if not train:
        return T.Compose(
            [
                T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(image_size),
                ToNormalizedTensor(mean, std),  # converts to RGB
            ]
        )
    if use_timm:
        from timm.data import create_transform

        options = {"scale": tuple(scale), "ratio": tuple(ratio) if ratio else None}
        options.update({"re_prob": re_prob or 0.0, "re_count": re_count or 1})
        return create_transform(
            input_size=(3, image_size, image_size),
            is_training=True,
            hflip=0.0,
            mean=tuple(mean),
            std=tuple(std),
            re_mode="pixel",
            interpolation="bicubic",
            color_jitter=color_jitter,  # None: no jitter, as OpenCLIP (timm's own default is 0.4)
            **{k: v for k, v in options.items() if v is not None},
        )
    steps: list[Callable] = [
        RandomResizedCrop(
            image_size,
            scale=tuple(scale),
            ratio=tuple(ratio) if ratio else (3 / 4, 4 / 3),
            interpolation=T.InterpolationMode.BICUBIC,
        )
    ]
    if color_jitter_prob or gray_scale_prob:
        steps.append(_to_rgb)  # before the color steps, as OpenCLIP (ToNormalizedTensor converts otherwise)
    if color_jitter_prob:
        steps.append(T.RandomApply([T.ColorJitter(*color_jitter)], p=color_jitter_prob))
    if gray_scale_prob:
        steps.append(T.RandomGrayscale(p=gray_scale_prob))
    steps.append(ToNormalizedTensor(mean, std))
    return T.Compose(steps)
