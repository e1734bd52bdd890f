"""The picture a viewer sees of a decoded image: upright, 8-bit, in sRGB, transparency on white; in RGB.

- EXIF orientation is applied.
- 16-bit samples (I;16 modes: 16-bit grayscale PNG and TIFF) are scaled to 8 bits, v * 255 / 65535 rounded; 32-bit
  integer samples likewise, float samples from 0-1; samples outside those ranges are stretched from their minimum to
  their maximum, never clipped. (Pillow already reads 16-bit RGB and RGBA as 8-bit.)
- An embedded ICC profile is converted to sRGB with LittleCMS (Pillow's ImageCms), perceptual intent, as a
  colour-managed viewer does: a Display P3 or Adobe RGB photo keeps its colours, a CMYK one is shown through its
  print profile (without one, Pillow's plain conversion). A profile that is sRGB already (no sample of a probe moves
  by more than one level) costs nothing; a broken or mismatched profile is ignored, as viewers ignore it. Transforms
  are built once per profile and kept (LittleCMS's transforms may be shared between threads since 2.3).
- Transparency (an alpha band, a palette's or a colour key's) is composited on white exactly as the model card's
  processor does (`transformers.image_transforms.convert_to_rgb`), so that a picture reaches the model as it did the
  processor in training.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict

from PIL import Image, ImageCms, ImageOps

EXIF_ORIENTATION = 0x0112
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
SIXTEEN_BIT_FULL_SCALE = 65535  # an I;16 sample's (and, by default, an I one's) white
TRANSFORMS_KEPT = 32  # built transforms kept, by profile and mode (a few MB at most: LittleCMS's own tables)
SRGB_TOLERANCE = 1  # a profile moving no probe sample by more than this many levels is sRGB already
WHITE = (255, 255, 255, 255)

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
_transforms: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
# Held while a transform is looked up or built: LittleCMS builds on its global context, which is not thread-safe.
_transforms_lock = threading.Lock()


def viewers_picture(image: Image.Image) -> Image.Image:
    """A loaded image as a colour-managed viewer shows it, in RGB (the steps above)."""
    image = upright(image)
    image = eight_bit(image)
    profile = image.info.get("icc_profile") or None
    if image.mode in ("P", "PA", "1") or (_has_transparency(image) and "A" not in image.getbands()):
        # Palettes and colour keys become an alpha band, as the processor's convert("RGBA") makes them.
        image = image.convert("RGBA" if _has_transparency(image) else "RGB")
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    colour = in_srgb(image, profile)
    del image
    if alpha is None:
        return colour
    colour.putalpha(alpha)
    return on_white(colour)


def on_white(image: Image.Image) -> Image.Image:
    """An image in RGB, any transparency composited on white: the processor's `convert_to_rgb`, step for step."""
    if not _has_transparency(image):
        return image.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA")).convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (itself when it says nothing)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        return ImageOps.exif_transpose(image)
    return image


def eight_bit(image: Image.Image) -> Image.Image:
    """An image of 16-bit, 32-bit or float samples as 8-bit L (LA with a colour key's transparency), scaled and never
    clipped; any other image as it is."""
    if image.mode not in HIGH_BIT_MODES:
        return image
    import numpy as np  # the worker's only (see contract.images)

    samples = np.asarray(image)
    low, high = (0.0, 1.0) if image.mode == "F" else (0.0, float(SIXTEEN_BIT_FULL_SCALE))
    if samples.size and (samples.min() < low or samples.max() > high):
        low, high = float(np.nanmin(samples)), float(np.nanmax(samples))
    if image.mode != "F" and (low, high) == (0.0, SIXTEEN_BIT_FULL_SCALE):
        # Integer arithmetic, rounded half up: a 16-bit sample 257 * v is exactly v.
        scaled = (samples.astype(np.uint32) * 255 + SIXTEEN_BIT_FULL_SCALE // 2) // SIXTEEN_BIT_FULL_SCALE
    else:
        span = (high - low) or 1.0
        scaled = np.rint(np.nan_to_num((samples.astype(np.float32) - low) * (255 / span)))
    gray = Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")
    colour_key = image.info.get("transparency")
    if isinstance(colour_key, int):  # the transparent sample, compared before scaling merges it with its neighbours
        gray = Image.merge("LA", (gray, Image.fromarray(((samples != colour_key) * 255).astype(np.uint8), "L")))
    gray.info = {name: value for name, value in image.info.items() if name != "transparency"}
    return gray


def in_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """The colour bands of an 8-bit image in sRGB, as RGB: through its ICC profile where there is a usable one."""
    if image.mode in ("LA", "RGBA"):
        image = image.convert(image.mode[:-1])  # the alpha band is kept apart by the caller
    if image.mode == "LAB":
        profile_mode: tuple[bytes | ImageCms.ImageCmsProfile, str] | None = (_LAB, "LAB")
    elif profile is not None and image.mode in ("L", "RGB", "CMYK"):
        profile_mode = (profile, image.mode)
    else:
        profile_mode = None
    transform = _srgb_transform(*profile_mode) if profile_mode is not None else None
    if transform is None:
        return image if image.mode == "RGB" else image.convert("RGB")  # no copy of a 12 MP picture for nothing
    converted = ImageCms.applyTransform(image, transform)
    assert converted is not None  # None only for a transform in place
    return converted


def _has_transparency(image: Image.Image) -> bool:
    """What the processor's convert_to_rgb takes for transparency: an alpha band or a transparent colour."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _srgb_transform(profile: bytes | ImageCms.ImageCmsProfile, mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform of `mode` pixels from `profile` to sRGB, built once; None for no change (or no usable one)."""
    digest = hashlib.sha256(profile).digest() if isinstance(profile, bytes) else mode.encode()
    key = (digest, mode)
    with _transforms_lock:
        if key in _transforms:
            _transforms.move_to_end(key)
            return _transforms[key]
        transform = _build_transform(profile, mode)
        _transforms[key] = transform
        while len(_transforms) > TRANSFORMS_KEPT:
            _transforms.popitem(last=False)
        return transform


def _build_transform(profile: bytes | ImageCms.ImageCmsProfile, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform to sRGB, or None for a profile that is broken, does not fit `mode`, or is sRGB already."""
    try:
        source = (
            profile if isinstance(profile, ImageCms.ImageCmsProfile) else ImageCms.ImageCmsProfile(io.BytesIO(profile))
        )
        transform = ImageCms.buildTransform(source, _SRGB, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return None if mode == "RGB" and _is_srgb(transform) else transform


def _is_srgb(transform: ImageCms.ImageCmsTransform) -> bool:
    """Whether an RGB transform moves no sample of a 16-level RGB cube by more than SRGB_TOLERANCE."""
    levels = bytes(range(0, 256, 17))
    cube = bytes(c for r in levels for g in levels for b in levels for c in (r, g, b))
    probe = Image.frombytes("RGB", (len(levels) ** 2, len(levels)), cube)
    moved = ImageCms.applyTransform(probe, transform)
    assert moved is not None
    return all(abs(a - b) <= SRGB_TOLERANCE for a, b in zip(moved.tobytes(), cube, strict=True))
