"""Image decoding, CLIP-style resize and crop, and CLIP normalisation.

Everything here works on numpy uint8 RGB arrays [H, W, 3] (the project's in-memory image
convention) and is pure and thread-safe: no global PIL setting is changed, so the
functions can run inside grain's read threads and worker processes.

Decoding policy (`decode_image`):
- Any PIL-readable format. The EXIF orientation is applied (a phone photo stored on its
  side comes out upright).
- Colour modes become RGB: CMYK and YCbCr through PIL's conversion; grayscale ('L', '1')
  is repeated over three channels; 16-bit grayscale ('I;16*', 'I') is scaled to 8 bits
  by v / 257 rounded, so 65535 -> 255 and an 8-bit value stored as v * 257 comes back
  exactly; float ('F') is clipped to [0, 255]; 16-bit RGB PNGs are reduced by PIL itself.
- Transparency (RGBA, LA, PA, a palette or RGB image with a transparent colour) is
  composited over WHITE, not dropped: dropping alpha exposes whatever colour the encoder
  left under transparent pixels (often black), while web images with transparency are
  meant to be seen on a light page.
- Images with more than `max_pixels` pixels are refused from their header, before any
  pixel is decoded. PIL refuses images above 2 * Image.MAX_IMAGE_PIXELS (about 179 MP)
  on its own (DecompressionBombError), so a `max_pixels` above that has no effect unless
  the application raises Image.MAX_IMAGE_PIXELS.
- Truncated files are errors (ImageFile.LOAD_TRUNCATED_IMAGES is left False).
Every failure raises ImageDecodeError naming the file and the reason.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# 50 megapixels: larger than any camera photo worth training on, small enough that a
# decompression bomb cannot exhaust a worker's memory (50 MP RGB = 150 MB decoded).
DEFAULT_MAX_PIXELS = 50_000_000

ImageSource = Union[bytes, bytearray, memoryview, str, os.PathLike]

_WHITE = (255, 255, 255, 255)


class ImageDecodeError(ValueError):
  """An image could not be decoded; `path` names the file (or '<bytes>'), `reason` why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 RGB images [..., H, W, 3] -> float32 (x / 255 - CLIP_MEAN) / CLIP_STD."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise TypeError(f"normalize expects uint8 images, got dtype {images.dtype}")
  if images.shape[-1:] != (3,):
    raise ValueError(f"normalize expects [..., H, W, 3] images, got shape {images.shape}")
  # Fold 1/255 into the scale so the whole thing is one multiply-add per element.
  std = np.asarray(CLIP_STD, np.float32)
  scale = 1.0 / (255.0 * std)
  offset = -np.asarray(CLIP_MEAN, np.float32) / std
  return images.astype(np.float32) * scale + offset


def _describe(source: ImageSource) -> str:
  if isinstance(source, (bytes, bytearray, memoryview)):
    return "<bytes>"
  return os.fspath(source)


def _to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB, following the policy in the module docstring."""
  mode = image.mode
  if mode in ("I", "F") or mode.startswith("I;16"):
    values = np.asarray(image, dtype=np.float64)
    if mode != "F":
      values = np.rint(values / 257.0)  # 16-bit range -> 8-bit range
    gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
  has_alpha = "A" in image.getbands() or mode in ("RGBa", "La") or (
      "transparency" in image.info)
  if has_alpha:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")
  if mode != "RGB":
    return image.convert("RGB")
  return image


def _open_checked(source: ImageSource, max_pixels: int | None):
  """Opens `source` lazily (header only) and refuses it if it is too big."""
  name = _describe(source)
  if isinstance(source, (bytes, bytearray, memoryview)):
    if len(source) == 0:
      raise ImageDecodeError(name, "empty data")
    fp = io.BytesIO(source)
  else:
    try:
      if os.path.getsize(source) == 0:
        raise ImageDecodeError(name, "zero-byte file")
    except OSError as e:
      raise ImageDecodeError(name, f"cannot read file ({e.strerror or e})") from e
    fp = source
  try:
    image = Image.open(fp)
  except Image.DecompressionBombError as e:
    raise ImageDecodeError(name, f"image too large: {e}") from e
  except UnidentifiedImageError as e:
    raise ImageDecodeError(name, "not a recognised image format") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageDecodeError(name, f"cannot open image ({e})") from e
  width, height = image.size
  if max_pixels is not None and width * height > max_pixels:
    image.close()
    raise ImageDecodeError(
        name, f"image too large: {width}x{height} = {width * height} pixels "
        f"> max_pixels {max_pixels}")
  return image


def decode_image(source: ImageSource, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Decodes image bytes or a file path into uint8 RGB [H, W, 3].

  Raises ImageDecodeError (with .path and .reason) for anything that is not a decodable
  image of at most `max_pixels` pixels (None: only PIL's own bomb limit applies).
  """
  name = _describe(source)
  image = _open_checked(source, max_pixels)
  try:
    with image:
      image.load()  # Decode now, so that truncation errors surface here.
      rgb = _to_rgb(ImageOps.exif_transpose(image))
      return np.asarray(rgb, dtype=np.uint8)
  except ImageDecodeError:
    raise
  # PIL reports corrupt or truncated data with a variety of exception types.
  except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
          struct.error) as e:
    raise ImageDecodeError(name, f"cannot decode image data ({e})") from e


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(height, width) after scaling the short side to `size`, as torchvision's Resize."""
  if height <= width:
    return size, int(size * width / height)
  return int(size * height / width), size


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> [size, size, 3]: CLIP's preprocessing.

  The short side is resized to `size` keeping the aspect ratio (bicubic; PIL widens the
  filter when shrinking, i.e. antialiases), then the centre size x size square is cut
  out (offsets rounded as torchvision's CenterCrop). Images already of the target size
  are returned unchanged.
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  new_h, new_w = resized_shape(height, width, size)
  if (new_h, new_w) != (height, width):
    pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = np.asarray(pil)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return image[top:top + size, left:left + size]


def load_image(source: ImageSource, size: int | None, *,
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """decode_image then resize_and_center_crop (size None: no resize)."""
  image = decode_image(source, max_pixels=max_pixels)
  if size is None:
    return image
  return resize_and_center_crop(image, size)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """A decoded array (e.g. from tfds) -> uint8 RGB [H, W, 3], by the decoding policy.

  Accepts [H, W] or [H, W, C] with C in 1 (gray), 2 (gray + alpha), 3 (RGB), 4 (RGBA);
  uint8, or uint16 (scaled by v / 257 rounded). Alpha is composited over white.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
    raise ValueError(f"expected an [H, W] or [H, W, 1|2|3|4] image, got {image.shape}")
  if image.dtype == np.uint16:
    image = np.rint(image / 257.0).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise ValueError(f"expected a uint8 or uint16 image, got {image.dtype}")
  channels = image.shape[-1]
  if channels in (2, 4):
    color = image[..., :-1].astype(np.float32)
    alpha = image[..., -1:].astype(np.float32) / 255.0
    image = np.rint(color * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image
