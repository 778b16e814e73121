"""decode_image on every case DESIGN.md names; every test image is built here."""

import json
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest

from happysad.decode import BACKGROUND, DECODABLE, MAX_PIXELS, REASONS, UNSUPPORTED, DecodeError, decode_image, read_flag
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
        (".gif", ()),  # OpenCV 5.1 writes and reads GIF (its own decoder, first frame)
        (".avif", (cv2.IMWRITE_AVIF_QUALITY, 100)),  # the wheel is built with libavif
    ],
)
def test_formats_decode_to_rgb(ext, params):
    assert_red_left(decode_image(encode(RED_LEFT, ext, params)))


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "AVIF"])
def test_first_frame_of_an_animation(fmt):
    """Pillow writes these (an encoder other than OpenCV's): frame 1 red-left, frame 2 all green."""
    from PIL import Image
    import io

    frames = [Image.fromarray(RED_LEFT), Image.fromarray(np.full_like(RED_LEFT, (0, 255, 0)))]
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "AVIF" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **extra)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 2
    assert_red_left(decode_image(buf.getvalue()))


def test_hand_built_gif89a():
    """The smallest GIF a hand can write: 2x1, a 2-colour global table (red, blue), LZW codes 2-bit."""
    lzw = bytes([0x02, 0x02, 0x44, 0x0A, 0x00])  # min code size 2; codes clear(4) 0 1 end(5), 3 bits each LSB-first; terminator
    gif = (
        b"GIF89a" + struct.pack("<HHBBB", 2, 1, 0x80, 0, 0) + bytes([255, 0, 0, 0, 0, 255])
        + b"\x2c" + struct.pack("<HHHHB", 0, 0, 2, 1, 0) + lzw + b"\x3b"
    )
    image = decode_image(gif)
    assert image[:, :60].mean(axis=(0, 1)).tolist() == [255, 0, 0] and image[:, 196:].mean(axis=(0, 1)).tolist() == [0, 0, 255]


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


def test_grey_alpha_png_is_composited_on_white():
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.stack([np.full((8, 8), 200, np.uint8), np.full((8, 8), 10, np.uint8)], -1), "LA").save(buf, "PNG")
    image = decode_image(buf.getvalue())
    assert image.shape == (256, 256, 3) and (image == round((200 * 10 + 255 * 245) / 255)).all()  # 253


def test_rgba_png_half_transparent_is_blended_with_white():
    bgra = cv2.cvtColor(cv2.cvtColor(RED_LEFT, cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 128
    image = decode_image(encode(bgra, ".png", raw=True))
    assert image[:, :100].reshape(-1, 3).tolist()[0] == [255, 127, 127]  # red 128/255 over white
    assert image[:, 156:].reshape(-1, 3).tolist()[0] == [127, 127, 255]


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


# --- formats refused by name ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, data",
    [
        ("heif", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 40),
        ("heif", b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00mif1" + b"\x00" * 40),  # generic brand, no avif
        ("jpegxl", b"\xff\x0a" + b"\x00" * 40),
        ("jpegxl", b"\x00\x00\x00\x0cJXL \r\n\x87\n" + b"\x00" * 40),
        ("jpeg2000", encode(RED_LEFT, ".jp2")),  # OpenCV writes (and could read) these: refused by choice
        ("pnm", encode(RED_LEFT, ".ppm")),
        ("pnm", encode(RED_LEFT, ".pam")),
        ("pfm", encode(RED_LEFT.astype(np.float32) / 255, ".pfm")),
        ("hdr", encode(RED_LEFT.astype(np.float32) / 255, ".hdr")),
        ("sunraster", encode(RED_LEFT, ".ras")),
    ],
)
def test_recognised_formats_we_refuse_are_unsupported_and_named(name, data):
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.reason == "unsupported"
    assert str(info.value) == f"unsupported: {UNSUPPORTED[name]}"


def test_avif_is_told_from_heif_by_its_brands():
    """An AVIF whose major brand is the generic mif1 is still AVIF (compatible brands list avif)."""
    data = bytearray(encode(RED_LEFT, ".avif", (cv2.IMWRITE_AVIF_QUALITY, 100)))
    assert data[8:12] == b"avif"
    data[8:12] = b"mif1"
    assert_red_left(decode_image(bytes(data)))


def test_text_starting_like_pnm_is_not_an_image():
    assert reason_of(b"P1 is the first point of the plan\n") == "not_an_image"


# --- transparency: composited on one background --------------------------------------------------


def cutout(hidden: tuple[int, int, int]) -> np.ndarray:
    """RGBA, 40x60: an opaque red left half, a transparent right half hiding `hidden`, a 50% blue stripe."""
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :30] = (255, 0, 0, 255)
    rgba[:, 30:] = (*hidden, 0)
    rgba[:, 12:18] = (0, 0, 255, 128)
    return rgba


HIDDEN = [(0, 0, 0), (0, 255, 0), (255, 0, 255)]  # three colours under alpha 0


def pillow(image, fmt: str, **params) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def palette_cutout(hidden, fmt):
    """Palette image: index 0 red, 1 blue, 2 (transparent) = `hidden`."""
    from PIL import Image

    index = np.zeros((40, 60), np.uint8)
    index[:, 30:] = 2
    index[:, 12:18] = 1
    image = Image.fromarray(index, "P")
    image.putpalette([255, 0, 0, 0, 0, 255, *hidden] + [0, 0, 0] * 253)
    return pillow(image, fmt, transparency=2)


def grey_key_cutout(hidden, sixteen_bit=False):
    """Grey PNG with a tRNS colour key: the transparent half holds the key value (the 'hidden' level)."""
    from PIL import Image

    key = 1 + sum(hidden) % 199  # 1, 57, 113: distinct from the visible levels 200 and 60
    grey = np.full((40, 60), 200, np.uint8)
    grey[:, 30:] = key
    grey[:, 12:18] = 60
    if sixteen_bit:
        return pillow(Image.fromarray(grey.astype(np.uint16) * 257), "PNG", transparency=key * 257)
    return pillow(Image.fromarray(grey, "L"), "PNG", transparency=key)


def la_cutout(hidden):
    from PIL import Image

    rgba = cutout(hidden)
    la = np.stack([cv2.cvtColor(rgba[..., :3], cv2.COLOR_RGB2GRAY), rgba[..., 3]], -1)
    return pillow(Image.fromarray(la, "LA"), "PNG")


def bgra(hidden, dtype=np.uint8):
    image = cv2.cvtColor(cutout(hidden), cv2.COLOR_RGBA2BGRA)
    return image.astype(np.uint16) * 257 if dtype == np.uint16 else image


MAKERS = {
    "png rgba": lambda h: encode(bgra(h), ".png", raw=True),
    "png rgba 16-bit": lambda h: encode(bgra(h, np.uint16), ".png", raw=True),
    "png grey+alpha": la_cutout,
    "png palette+tRNS": lambda h: palette_cutout(h, "PNG"),
    "png rgb+tRNS": lambda h: pillow(__import__("PIL.Image").Image.fromarray(cutout(h)[..., :3]), "PNG", transparency=h),
    "png grey+tRNS": grey_key_cutout,
    "png grey 16-bit+tRNS": lambda h: grey_key_cutout(h, sixteen_bit=True),
    # exact: libwebp otherwise rewrites colours under alpha 0 itself, and the three files would be one.
    "webp lossless": lambda h: pillow(__import__("PIL.Image").Image.fromarray(cutout(h), "RGBA"), "WEBP", lossless=True, exact=True),
    "gif transparent index": lambda h: palette_cutout(h, "GIF"),
    "tiff rgba": lambda h: pillow(__import__("PIL.Image").Image.fromarray(cutout(h), "RGBA"), "TIFF"),
    "tiff rgba 16-bit": lambda h: encode(bgra(h, np.uint16), ".tiff", raw=True),
    "bmp bgra": lambda h: encode(bgra(h), ".bmp", raw=True),
    "avif lossless": lambda h: encode(bgra(h), ".avif", (cv2.IMWRITE_AVIF_QUALITY, 100), raw=True),
}


@pytest.mark.parametrize("kind", MAKERS)
def test_hidden_pixels_never_decide(kind):
    """Three files that look the same (same visible pixels, different colours under alpha 0) decode alike."""
    files = [MAKERS[kind](h) for h in HIDDEN]
    assert len(set(files)) == 3, "the files must differ"
    images = [decode_image(f) for f in files]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])
    assert (images[0][:, 160:] == BACKGROUND).all()  # the transparent half is the background, exactly


@pytest.mark.parametrize("kind", ["png rgba", "png rgba 16-bit", "webp lossless", "tiff rgba", "tiff rgba 16-bit", "bmp bgra", "avif lossless"])
def test_half_transparent_pixels_blend_with_the_background(kind):
    """The 50% blue stripe (alpha 128) over white is (127, 127, 255), whatever the format stores."""
    image = decode_image(MAKERS[kind](HIDDEN[1]), size=60)  # no resize: 60 is the width; rows stretch 40 -> 60
    assert np.abs(image[:, 13:17].astype(int) - (127, 127, 255)).max() <= 2, image[0, 13:17]
    assert (image[:, :10] == (255, 0, 0)).all()


def test_a_16_bit_colour_key_is_one_value_not_its_8_bit_neighbourhood():
    from PIL import Image

    grey16 = np.array([[1000, 1001, 60000]], np.uint16)  # 1000 and 1001 are both 4 in 8 bits
    image = decode_image(pillow(Image.fromarray(grey16), "PNG", transparency=1000), size=3)
    assert image[0, :, 0].tolist() == [255, 4, 233]


def test_background_is_white():
    """docs/scoring.md names the background; BACKGROUND is the level in each of R, G and B."""
    assert BACKGROUND == 255


def test_transparent_png_keeps_exif_orientation():
    """The alpha path orients as OpenCV does on the opaque path, for all 8 EXIF tags."""
    from PIL import Image

    picture = corners(64, 48)
    rgba = np.dstack([picture, np.full((48, 64), 255, np.uint8)])
    rgba[0, 0, 3] = 0  # one transparent pixel (hiding red): the alpha path is taken
    picture[0, 0] = BACKGROUND  # how that pixel looks
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        opaque = pillow(Image.fromarray(picture), "PNG", exif=exif.tobytes())
        transparent = pillow(Image.fromarray(rgba, "RGBA"), "PNG", exif=exif.tobytes())
        np.testing.assert_array_equal(decode_image(transparent), decode_image(opaque), err_msg=str(orientation))


def test_avif_rotation_and_mirror_boxes_are_applied():
    """Pillow stores EXIF orientation as AVIF irot/imir boxes, which OpenCV 5.1 ignores: we apply them.

    The reference is the same orientation stored in a PNG's EXIF and applied by OpenCV.
    """
    from PIL import Image

    picture = corners(64, 48)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        avif = pillow(Image.fromarray(picture), "AVIF", exif=exif.tobytes(), quality=100)
        png = pillow(Image.fromarray(picture), "PNG", exif=exif.tobytes())
        upright = decode_image(pillow(Image.fromarray(picture), "PNG"))
        assert abs_diff(decode_image(avif), decode_image(png)).mean() < 4, orientation  # lossy AVIF: chroma edges
        assert orientation == 1 or abs_diff(decode_image(png), upright).mean() > 40  # the tag changes the picture


def test_ten_bit_avif_scales_to_8_bit():
    bgr10 = cv2.cvtColor(RED_LEFT, cv2.COLOR_RGB2BGR).astype(np.uint16) * 4  # 0-1020 of 1023
    data = encode(bgr10, ".avif", (cv2.IMWRITE_AVIF_DEPTH, 10, cv2.IMWRITE_AVIF_QUALITY, 100), raw=True)
    assert_red_left(decode_image(data), tolerance=8)


def test_bmp_with_all_zero_alpha_is_opaque():
    """A 32-bit BMP whose alpha bytes are all 0 uses them as padding (browsers show it opaque)."""
    image = bgra(HIDDEN[0])
    image[..., 3] = 0
    image[..., :3] = cv2.cvtColor(RED_LEFT, cv2.COLOR_RGB2BGR)
    assert_red_left(decode_image(encode(image, ".bmp", raw=True)))


@pytest.mark.parametrize("ext, params", [(".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), (".gif", ()), (".avif", ())])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_cut_short_newer_formats_are_truncated(ext, params, keep):
    noise = np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    data = encode(noise, ext, params)
    assert reason_of(data[: int(len(data) * keep)]) == "truncated"


# --- the pixel limit counts decoded pixels ------------------------------------------------------


def too_large_detail(data: bytes, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == "too_large"
    return str(info.value)


def test_large_baseline_jpeg_is_read_reduced_not_refused():
    """9000x9000 (81 MP, 1.4 MB) was too_large under the 50 MP limit; at 1/8 it decodes to 1125x1125."""
    side = 9000
    grey = np.tile(np.linspace(0, 255, side, dtype=np.uint8), (side, 1))
    data = encode(grey, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 80), raw=True)
    del grey
    assert side * side > MAX_PIXELS and read_flag("jpeg", (side, side), 256) == cv2.IMREAD_REDUCED_COLOR_8
    image = decode_image(data)
    assert image.shape == (256, 256, 3)
    assert image[:, :20].mean() < 30 and image[:, -20:].mean() > 225  # the gradient, dark to light


def test_the_limit_applies_after_reduction_for_baseline_but_not_progressive_jpegs():
    """At 2048x2048 and a 1 MP limit: a baseline JPEG decodes at 1/8 (256x256); the same picture
    progressive, or as a PNG, counts at full size (4.2 MP) and is refused."""
    rgb = photo(2048, 2048)
    baseline = encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90))
    progressive = encode(rgb, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1))
    assert decode_image(baseline, max_pixels=1_000_000).shape == (256, 256, 3)
    # A JPEG appended after the end (MPF, an Ultra HDR gain map) holds scans the decoder never reads.
    assert decode_image(baseline + encode(RED_LEFT, ".jpg"), max_pixels=1_000_000).shape == (256, 256, 3)
    detail = too_large_detail(progressive, max_pixels=1_000_000)
    assert detail == (
        "too_large: progressive or multi-scan jpeg 2048x2048 counts at full size, 4.19 MP "
        "(its decoder holds every coefficient), over the 1 MP limit on decoded pixels"
    )
    detail = too_large_detail(encode(rgb, ".png"), max_pixels=1_000_000)
    assert detail == "too_large: png 2048x2048 decodes to 4.19 MP, over the 1 MP limit on decoded pixels"
    # A smaller target reduces less, so the same baseline JPEG can be over the limit after reduction.
    assert read_flag("jpeg", (2048, 2048), 1024) == cv2.IMREAD_REDUCED_COLOR_2
    detail = too_large_detail(baseline, size=1024, max_pixels=1_000_000)
    assert detail == "too_large: jpeg 2048x2048 decodes at 1/2 to 1024x1024, 1.05 MP, over the 1 MP limit on decoded pixels"


def test_a_jpeg_still_over_the_limit_after_reduction_names_it():
    data = bytearray(encode(RED_LEFT, ".jpg"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    detail = too_large_detail(bytes(data))
    assert detail == "too_large: jpeg 60000x60000 decodes at 1/8 to 7500x7500, 56.2 MP, over the 50 MP limit on decoded pixels"


def test_png_limit_message_names_megapixels():
    header = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
    data = header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + png_chunk(b"IEND", b"")
    assert too_large_detail(data) == "too_large: png 40000x40000 decodes to 1600.0 MP, over the 50 MP limit on decoded pixels"


def test_avif_limit_reads_the_item_size_from_the_boxes():
    data = encode(RED_LEFT, ".avif", (cv2.IMWRITE_AVIF_QUALITY, 100))
    assert too_large_detail(data, max_pixels=1000) == "too_large: avif 60x40 decodes to 0.0024 MP, over the 0.001 MP limit on decoded pixels"


# --- docs and CLI name what decode_image does ---------------------------------------------------

FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP", "gif": "GIF", "avif": "AVIF",
                "heif": "HEIC", "jpegxl": "JPEG XL", "jpeg2000": "JPEG 2000", "pnm": "PNM", "pfm": "PFM", "hdr": "HDR", "sunraster": "Sun raster"}


def test_docs_section_names_every_format_the_background_and_the_limit():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "scoring.md").read_text(encoding="utf-8")
    start = text.index("## Supported images")
    section = text[start : text.index("\n## ", start + 1)]
    assert text.index("## Supported images") < text.index("## Predict")
    for fmt in (*DECODABLE, *UNSUPPORTED):
        assert FORMAT_NAMES[fmt] in section, fmt
    assert "white" in section and f"{MAX_PIXELS // 1_000_000} MP" in section and "1/8" in section


def test_score_input_help_names_the_formats():
    from happysad.cli import build_parser

    parser = build_parser()
    score = parser._subparsers._group_actions[0].choices["score"]
    (action,) = [a for a in score._actions if "--input" in a.option_strings]
    for fmt in DECODABLE:
        assert FORMAT_NAMES[fmt] in action.help, fmt
