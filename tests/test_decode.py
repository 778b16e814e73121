"""decode_image on every case DESIGN.md names; every test image is built here."""

import json
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from happysad.decode import REASONS, DecodeError, decode_image, read_flag
from happysad import synth

RED_LEFT = np.zeros((40, 60, 3), np.uint8)  # RGB: red left half, blue right half
RED_LEFT[:, :30] = (255, 0, 0)
RED_LEFT[:, 30:] = (0, 0, 255)


def encode(rgb_or_raw: np.ndarray, ext: str, params=(), raw: bool = False) -> bytes:
    """Encode with OpenCV; `raw` arrays (grey, BGRA, 16-bit) are written as given."""
    image = rgb_or_raw if raw else cv2.cvtColor(rgb_or_raw, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


def assert_red_left(image: np.ndarray, tolerance: int = 40) -> None:
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    left, right = image[:, :100].mean(axis=(0, 1)), image[:, 156:].mean(axis=(0, 1))
    assert left[0] > 255 - tolerance and left[2] < tolerance, left
    assert right[2] > 255 - tolerance and right[0] < tolerance, right


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.reason in REASONS
    return info.value.reason


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@pytest.mark.parametrize(
    "ext, params",
    [
        (".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)),
        (".jpg", (cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95)),
        (".png", ()),
        (".bmp", ()),
        (".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)),
        (".tiff", ()),
    ],
)
def test_formats_decode_to_rgb(ext, params):
    assert_red_left(decode_image(encode(RED_LEFT, ext, params)))


def test_cmyk_jpeg():
    # A 4-component Adobe JPEG with inverted CMYK, as Photoshop writes it: the shape decoders must handle.
    from PIL import Image  # Pillow comes with matplotlib; used only to write the fixture

    import io

    buf = io.BytesIO()
    Image.fromarray(RED_LEFT).convert("CMYK").save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_red_left(decode_image(data), tolerance=60)


def test_grey_jpeg_and_png_become_rgb():
    grey = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (32, 1))
    for ext in (".jpg", ".png"):
        image = decode_image(encode(grey, ext, raw=True))
        assert image.shape == (256, 256, 3)
        assert np.abs(image[..., 0].astype(int) - image[..., 2]).max() <= 1  # grey in every channel
        assert image[:, :20].mean() < 60 and image[:, -20:].mean() > 200


def test_grey_alpha_png():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 10, np.uint8)], -1), "LA").save(buf, "PNG")
    image = decode_image(buf.getvalue())
    assert image.shape == (256, 256, 3) and abs(int(image.mean()) - 200) <= 2


def test_rgba_png_drops_alpha():
    bgra = cv2.cvtColor(cv2.cvtColor(RED_LEFT, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 128
    assert_red_left(decode_image(encode(bgra, ".png", raw=True)))


def test_palette_png():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(RED_LEFT).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "P"
    assert_red_left(decode_image(buf.getvalue()))


def test_16bit_png_scales_to_8bit():
    bgr16 = cv2.cvtColor(RED_LEFT, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
    assert_red_left(decode_image(encode(bgr16, ".png", raw=True)))


def test_exif_orientation_is_applied():
    """A JPEG stored with the red half on the left but EXIF orientation 3 (rotate 180) shows red on the right."""
    from PIL import Image
    import io

    exif = Image.Exif()
    exif[0x0112] = 3
    buf = io.BytesIO()
    Image.fromarray(RED_LEFT).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    image = decode_image(buf.getvalue())
    flipped = image[:, ::-1]
    assert_red_left(flipped)


def test_tiny_and_extreme_aspect_ratio():
    assert decode_image(encode(np.full((1, 1, 3), 77, np.uint8), ".png")).shape == (256, 256, 3)
    wide = np.zeros((3, 4000, 3), np.uint8)
    wide[:, :2000] = (255, 0, 0)
    wide[:, 2000:] = (0, 0, 255)
    assert_red_left(decode_image(encode(wide, ".png")))


def test_size_argument():
    assert decode_image(encode(RED_LEFT, ".png"), size=32).shape == (32, 32, 3)


def test_format_is_decided_by_content_not_name(tmp_path):
    png_named_jpg = tmp_path / "photo.JPG"
    png_named_jpg.write_bytes(encode(RED_LEFT, ".png"))
    no_extension = tmp_path / "photo"
    no_extension.write_bytes(encode(RED_LEFT, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 95)))
    for path in (png_named_jpg, no_extension):
        assert_red_left(decode_image(path.read_bytes()))


def test_empty():
    assert reason_of(b"") == "empty"


@pytest.mark.parametrize(
    "data",
    [b"hello, I am a text file\n", b"<!doctype html><html><body>404</body></html>", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))],
    ids=["text", "html", "random"],
)
def test_not_an_image(data):
    assert reason_of(data) == "not_an_image"


@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 30 / 1000])
def test_cut_short_is_truncated(ext, keep):
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    data = encode(noise, ext)
    assert reason_of(data[: int(len(data) * keep)]) == "truncated"


def test_png_bomb_is_refused_from_the_header_in_bounded_memory():
    """A 40000x40000 PNG whose IDAT is a few KB of zlib: refused before decoding, peak RSS grows < 100 MB."""
    script = """
import json, resource, struct, zlib
from happysad.decode import DecodeError, decode_image
def chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
side = 40000
row = b"\\0" + bytes(side * 3)
z = zlib.compressobj(9)
idat = b"".join(z.compress(row) for _ in range(50)) + z.flush()
bomb = b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(bomb)
    reason = None
except DecodeError as e:
    reason = e.reason
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"reason": reason, "grew_kb": after - before}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["reason"] == "too_large"
    assert result["grew_kb"] < 100_000


def test_jpeg_header_claiming_too_many_pixels():
    data = bytearray(encode(RED_LEFT, ".jpg"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    assert reason_of(bytes(data)) == "too_large"


def test_pixel_limit_is_a_parameter():
    with pytest.raises(DecodeError) as info:
        decode_image(encode(RED_LEFT, ".png"), max_pixels=100)
    assert info.value.reason == "too_large"


def test_recognised_but_undecodable_format_is_unsupported():
    gif = b"GIF89a" + struct.pack("<HH", 10, 10) + b"\x00" * 20
    assert reason_of(gif) in ("unsupported", "truncated")
    heic = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40
    assert reason_of(heic) == "unsupported"


def test_garbage_after_a_valid_signature_never_crashes():
    rng = np.random.default_rng(2)
    good = encode(RED_LEFT, ".jpg")
    for _ in range(200):
        data = bytearray(good)
        for i in rng.integers(2, len(data), 20):
            data[i] = rng.integers(0, 256)
        try:
            image = decode_image(bytes(data))
        except DecodeError as exc:
            assert exc.reason in REASONS
        else:
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8


# --- large JPEGs: reduced (DCT-domain) decode --------------------------------------------------

FULL = cv2.IMREAD_COLOR_RGB


def photo(width: int = 4000, height: int = 3000, seed: int = 0) -> np.ndarray:
    """The synthetic photo as RGB."""
    return cv2.cvtColor(synth.photo(seed, width, height), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(photo(), ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90))


def full_area(data: bytes) -> np.ndarray:
    """The reference: full-size decode, then area interpolation (the best plain downscaler)."""
    full = cv2.imdecode(np.frombuffer(data, np.uint8), FULL)
    return cv2.resize(full, (256, 256), interpolation=cv2.INTER_AREA)


def abs_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def test_large_jpeg_is_within_tolerance_of_full_decode_and_area(large_jpeg):
    """The tolerance decode.py states: mean abs difference <= 1.0, max <= 48 (0-255) at 12 MP."""
    assert read_flag("jpeg", (4000, 3000), 256) == cv2.IMREAD_REDUCED_COLOR_8
    diff = abs_diff(decode_image(large_jpeg), full_area(large_jpeg))
    assert diff.mean() <= 1.0 and diff.max() <= 48, (diff.mean(), diff.max())


@pytest.mark.parametrize("width, height, flag", [(2000, 1500, cv2.IMREAD_REDUCED_COLOR_4), (1000, 750, cv2.IMREAD_REDUCED_COLOR_2)])
def test_smaller_reductions_are_no_further_from_area_than_full_linear(large_jpeg, width, height, flag):
    assert read_flag("jpeg", (width, height), 256) == flag
    rgb = cv2.resize(cv2.imdecode(np.frombuffer(large_jpeg, np.uint8), FULL), (width, height), interpolation=cv2.INTER_AREA)
    data = encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90))
    reference = full_area(data)
    full_linear = cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), FULL), (256, 256), interpolation=cv2.INTER_LINEAR)
    assert abs_diff(decode_image(data), reference).mean() <= abs_diff(full_linear, reference).mean()


def corners(width: int, height: int) -> np.ndarray:
    """Four colours in four quadrants: every one of EXIF's 8 orientations gives a different picture."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2 :] = (0, 255, 0)
    image[height // 2 :, : width // 2] = (0, 0, 255)
    return image


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_exif_rotated_large_jpeg_matches_full_decode(orientation):
    """A reduced decode ends in the same orientation as a full one, and as Pillow's exif_transpose."""
    from PIL import Image, ImageOps
    import io

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(corners(2560, 2048)).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    assert read_flag("jpeg", (2560, 2048), 256) == cv2.IMREAD_REDUCED_COLOR_8
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    expected = cv2.resize(upright, (256, 256), interpolation=cv2.INTER_AREA)
    image = decode_image(data)
    assert abs_diff(image, full_area(data)).mean() < 2
    assert abs_diff(image, expected).mean() < 2
    assert abs_diff(image, cv2.resize(corners(2560, 2048), (256, 256))).mean() > 40  # the tag did change the picture


@pytest.mark.parametrize("mode", ["RGB", "CMYK"])
def test_large_jpeg_colour_order(mode):
    """Reduced modes decode BGR (CMYK too); red must still land in channel 0."""
    from PIL import Image
    import io

    big = cv2.resize(RED_LEFT, (3000, 2048), interpolation=cv2.INTER_NEAREST)
    buf = io.BytesIO()
    Image.fromarray(big).convert(mode).save(buf, "JPEG", quality=95)
    assert read_flag("jpeg", (3000, 2048), 256) == cv2.IMREAD_REDUCED_COLOR_8
    assert_red_left(decode_image(buf.getvalue()), tolerance=60 if mode == "CMYK" else 40)


@pytest.mark.parametrize(
    "fmt, dims, flag",
    [
        ("jpeg", (511, 4000), FULL),  # one side under 2x: full decode
        ("jpeg", (512, 512), cv2.IMREAD_REDUCED_COLOR_2),
        ("jpeg", (1024, 1023), cv2.IMREAD_REDUCED_COLOR_2),
        ("jpeg", (3000, 1024), cv2.IMREAD_REDUCED_COLOR_4),
        ("jpeg", (2048, 2048), cv2.IMREAD_REDUCED_COLOR_8),
        ("png", (4000, 3000), FULL),  # only JPEG decoders reduce in the DCT domain
    ],
)
def test_reduction_factor_choice(fmt, dims, flag):
    assert read_flag(fmt, dims, 256) == flag


def test_small_jpeg_takes_the_full_path():
    rgb = photo(500, 400)
    data = encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90))
    full = cv2.resize(cv2.imdecode(np.frombuffer(data, np.uint8), FULL), (256, 256), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(decode_image(data), full)
