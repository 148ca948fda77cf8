"""images.py: robust decoding to RGB uint8, CLIP resize + centre crop, CLIP normalisation."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from input_pipeline import images
from input_pipeline.images import ImageDecodeError


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kw)
  return buf.getvalue()


def _png(width, height, bit_depth, color_type, row: bytes) -> bytes:
  """A PNG written by hand (PIL cannot write 48-bit RGB or stream huge images cheaply)."""
  def chunk(tag, data):
    return (struct.pack(">I", len(data)) + tag + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))
  compressor = zlib.compressobj(9)
  scanline = b"\x00" + row  # filter type 0
  data = b"".join(compressor.compress(scanline) for _ in range(height)) + compressor.flush()
  header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
          + chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------
# normalize

def test_normalize_matches_clip_formula_per_channel():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
  out = images.normalize(x)
  expected = (x.astype(np.float64) / 255.0 - np.array(images.CLIP_MEAN)) / np.array(
      images.CLIP_STD)
  assert out.dtype == np.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
  # Channel order is R, G, B: a pure value per channel lands on that channel's constants.
  white = images.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0]
  np.testing.assert_allclose(
      white, (1 - np.array(images.CLIP_MEAN)) / np.array(images.CLIP_STD), atol=2e-6)


def test_normalize_refuses_non_uint8_and_non_rgb():
  with pytest.raises(TypeError, match="uint8"):
    images.normalize(np.zeros((2, 2, 3), np.float32))
  with pytest.raises(ValueError, match="H, W, 3"):
    images.normalize(np.zeros((2, 2, 4), np.uint8))


# ---------------------------------------------------------------------------------------
# decoding of unusual but valid images

def test_16bit_grayscale_png_is_scaled_to_8_bits():
  values = np.array([[0, 257 * 100, 32768, 65535]], np.uint16)
  decoded = images.decode_image(_encode(Image.fromarray(values), "PNG"))
  assert decoded.dtype == np.uint8 and decoded.shape == (1, 4, 3)
  np.testing.assert_array_equal(decoded[0, :, 0], [0, 100, 128, 255])
  assert (decoded == decoded[..., :1]).all()  # gray: equal channels


def test_16bit_rgb_png_is_reduced_to_8_bits():
  row = struct.pack(">" + "H" * 6, 65535, 0, 32768, 0, 65535, 257 * 7)
  decoded = images.decode_image(_png(2, 3, 16, 2, row))
  assert decoded.shape == (3, 2, 3)
  np.testing.assert_array_equal(decoded[1], [[255, 0, 128], [0, 255, 7]])


def test_cmyk_jpeg_white_stays_white_and_colours_convert():
  cmyk = Image.new("CMYK", (16, 16), (0, 0, 0, 0))
  cmyk.paste((255, 0, 0, 0), (8, 0, 16, 16))  # right half pure cyan
  decoded = images.decode_image(_encode(cmyk, "JPEG", quality=100))
  assert decoded.shape == (16, 16, 3)
  assert (decoded[:, :6] >= 253).all()  # white
  cyan = decoded[:, 10:].reshape(-1, 3).astype(int)
  assert (cyan[:, 0] <= 3).all() and (cyan[:, 1:] >= 252).all()


def test_rgba_png_is_composited_on_white():
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)   # opaque red stays red
  rgba[0, 1] = (0, 0, 0, 0)       # transparent black becomes white
  rgba[0, 2] = (0, 0, 0, 128)     # half-transparent black becomes mid gray
  rgba[1] = (10, 20, 30, 255)
  decoded = images.decode_image(_encode(Image.fromarray(rgba), "PNG"))
  np.testing.assert_array_equal(decoded[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(decoded[0, 1], [255, 255, 255])
  np.testing.assert_allclose(decoded[0, 2], [127, 127, 127], atol=1)
  np.testing.assert_array_equal(decoded[1], [[10, 20, 30]] * 3)


def test_palette_png_with_transparency_is_composited_on_white():
  pal = Image.new("P", (4, 1))
  pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6))
  pal.putdata([0, 1, 1, 0])
  data = _encode(pal, "PNG", transparency=0)
  assert Image.open(io.BytesIO(data)).mode == "P"
  decoded = images.decode_image(data)
  np.testing.assert_array_equal(
      decoded[0], [[255, 255, 255], [200, 0, 0], [200, 0, 0], [255, 255, 255]])


def test_grayscale_and_gray_alpha_become_three_equal_channels():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  decoded = images.decode_image(_encode(Image.fromarray(gray), "PNG"))
  np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=-1))
  la = Image.fromarray(gray).convert("LA")
  la.putalpha(0)  # fully transparent: white
  np.testing.assert_array_equal(images.decode_image(_encode(la, "PNG")), 255)


def test_exif_orientation_is_applied(tmp_path):
  image = Image.new("RGB", (20, 10), (0, 0, 255))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  path = tmp_path / "rotated.jpg"
  image.save(path, "JPEG", exif=exif)
  assert images.decode_image(path).shape == (20, 10, 3)


def test_decoded_arrays_from_tfds_become_rgb():
  gray = np.full((2, 2, 1), 7, np.uint8)
  np.testing.assert_array_equal(images.to_rgb_uint8(gray), 7)
  rgba = np.zeros((1, 1, 4), np.uint8)
  np.testing.assert_array_equal(images.to_rgb_uint8(rgba), 255)
  np.testing.assert_array_equal(images.to_rgb_uint8(np.full((1, 1), 65535, np.uint16)), 255)


# ---------------------------------------------------------------------------------------
# undecodable input: a specific error naming the file and the reason

def test_truncated_jpeg_raises_decode_error_naming_file(tmp_path):
  rng = np.random.default_rng(0)
  data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
  path = tmp_path / "truncated.jpg"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ImageDecodeError, match="truncated") as err:
    images.decode_image(path)
  assert err.value.path == str(path)
  assert str(path) in str(err.value)


@pytest.mark.parametrize("content,reason", [
    (b"", "zero-byte"),
    (b"this is a caption, not an image\n", "not a recognised image"),
])
def test_zero_byte_and_non_image_files_raise_decode_error(tmp_path, content, reason):
  path = tmp_path / "bad.jpg"
  path.write_bytes(content)
  with pytest.raises(ImageDecodeError, match=reason) as err:
    images.decode_image(path)
  assert err.value.path == str(path)


def test_missing_file_and_empty_bytes_raise_decode_error(tmp_path):
  with pytest.raises(ImageDecodeError, match="cannot read"):
    images.decode_image(tmp_path / "nope.png")
  with pytest.raises(ImageDecodeError, match="empty"):
    images.decode_image(b"")


def test_image_over_the_configured_pixel_limit_is_refused():
  data = _encode(Image.new("RGB", (100, 60)), "PNG")
  assert images.decode_image(data, max_pixels=6000).shape == (60, 100, 3)
  with pytest.raises(ImageDecodeError, match="too large: 100x60 = 6000 pixels > max_pixels"):
    images.decode_image(data, max_pixels=5999)


def test_image_over_50_megapixels_is_refused_by_default_without_decoding(monkeypatch):
  # 8000 x 6500 = 52 MP, 1-bit gray: the PNG is small and cheap to make.
  data = _png(8000, 6500, 1, 0, bytes(1000))
  assert images.DEFAULT_MAX_PIXELS == 50_000_000

  def no_decoding(self):
    raise AssertionError("pixels were decoded")
  monkeypatch.setattr(Image.Image, "load", no_decoding)
  monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
  start = time.perf_counter()
  with pytest.raises(ImageDecodeError, match="too large: 8000x6500"):
    images.decode_image(data)
  assert time.perf_counter() - start < 1.0


def test_decompression_bomb_beyond_pil_limit_becomes_decode_error():
  side = 13_400  # 179.6 MP > 2 * Image.MAX_IMAGE_PIXELS: PIL itself refuses at open
  assert side * side > 2 * Image.MAX_IMAGE_PIXELS
  data = _png(side, side, 1, 0, bytes(side // 8 + 1))
  with pytest.raises(ImageDecodeError, match="too large"):
    images.decode_image(data, max_pixels=None)


# ---------------------------------------------------------------------------------------
# resize + centre crop

@pytest.mark.parametrize("height,width", [(90, 130), (130, 90), (64, 64), (20, 30), (641, 480)])
def test_resize_and_center_crop_gives_target_size(height, width):
  image = np.zeros((height, width, 3), np.uint8)
  assert images.resize_and_center_crop(image, 64).shape == (64, 64, 3)


def test_resized_shape_scales_short_side_keeping_aspect():
  assert images.resized_shape(200, 400, 100) == (100, 200)
  assert images.resized_shape(400, 200, 100) == (200, 100)
  assert images.resized_shape(480, 641, 224) == (224, 299)  # truncated, as torchvision


@pytest.mark.parametrize("landscape", [True, False])
def test_resize_and_center_crop_keeps_the_centre(landscape):
  # Three bands along the long side: 100 red, 200 green, 100 blue (of 400 by 200).
  image = np.zeros((200, 400, 3), np.uint8)
  image[:, :100] = (255, 0, 0)
  image[:, 100:300] = (0, 255, 0)
  image[:, 300:] = (0, 0, 255)
  if not landscape:
    image = image.transpose(1, 0, 2)
  out = images.resize_and_center_crop(image, 100)
  if not landscape:
    out = out.transpose(1, 0, 2)
  # Resized to 200 x 100 the green band is columns 50..150: exactly the crop. Bicubic
  # ringing may touch the two edge columns only.
  np.testing.assert_array_equal(out[:, 2:-2], np.broadcast_to([0, 255, 0], (100, 96, 3)))
  assert (out[:, [0, -1], 1] >= 200).all()


def test_resize_and_center_crop_matches_hugging_face_clip_preprocessing():
  transformers = pytest.importorskip("transformers")
  processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or (
      transformers.CLIPImageProcessor)
  processor = processor_cls(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                            do_normalize=False, do_rescale=False)
  rng = np.random.default_rng(1)
  for shape in [(90, 130, 3), (200, 120, 3)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
    theirs = np.transpose(theirs, (1, 2, 0))  # CHW -> HWC
    np.testing.assert_array_equal(images.resize_and_center_crop(image, 64), theirs)


def test_load_image_decodes_then_resizes(tmp_path):
  path = tmp_path / "x.png"
  Image.new("RGB", (50, 30), (1, 2, 3)).save(path)
  out = images.load_image(path, 16)
  assert out.shape == (16, 16, 3)
  np.testing.assert_array_equal(out, np.broadcast_to([1, 2, 3], (16, 16, 3)))
