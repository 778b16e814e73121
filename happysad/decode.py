"""Image bytes -> (size, size, 3) uint8 RGB, the one decode that training and scoring share.

Pure numpy/OpenCV. The format is decided from the bytes, never the file name,
and the pixel count is read from the header *before* anything is decoded, so
a decompression bomb costs a few bytes of parsing, not gigabytes.

A JPEG at least 2x, 4x or 8x the target size on both sides is decoded at
1/2, 1/4 or 1/8 scale in the DCT domain (OpenCV's IMREAD_REDUCED_COLOR_*),
the largest factor that keeps both sides >= size, then resized as usual.
12 MP photos decode ~2.8x faster on one core (bench/decode_speed.py), and the
result is *closer* to full decode + INTER_AREA than full decode + INTER_LINEAR
is: DCT scaling averages pixels, so there is less aliasing.
Tolerance, asserted in tests/test_decode.py on a synthetic 4000x3000 photo
(x8): mean abs difference <= 1.0 and max <= 48 (0-255) against full decode +
INTER_AREA; measured ~0.6 / 33 there, 0.45 / 28 on a real 12 MP photo
(FIELD_NOTES). For x2 and x4 the mean difference is asserted to be no larger
than the full + INTER_LINEAR path's; single pixels at hard edges may differ
more (max 95 vs 60 on drawn 512-800 px faces, x2).
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported")

MAX_PIXELS = 50_000_000  # a header claiming more than this is refused undecoded
# Bilinear, as the seed's image_dataset_from_directory; INTER_AREA is ~2.4x slower here.
INTERPOLATION = cv2.INTER_LINEAR
# Formats OpenCV decodes for us; anything else recognised as an image is "unsupported".
DECODABLE = ("jpeg", "png", "bmp", "webp", "tiff")
# JPEG DCT-domain reductions, largest first. They return BGR and OpenCV 5 refuses to
# combine them with IMREAD_COLOR_RGB; they do apply EXIF orientation (checked, all 8 tags).
REDUCED_MODES = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


class DecodeError(ValueError):
    """Why some bytes are not a usable image; `.reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading magic bytes, or None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"avis"):
        return "heif"
    return None


def _jpeg_scan(data: bytes) -> tuple[tuple[int, int] | None, int]:
    """(width, height) from the first SOF marker, and the offset of the scan data (-1 if none)."""
    size, pos = None, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return size, -1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return size, pos + 2 + length
        pos += 2 + length
    return size, -1


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    found = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            fmt = "H" if kind == 3 else "I"
            found[tag] = struct.unpack(order + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
    return (found[256], found[257]) if len(found) == 2 else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def header_size(data: bytes, fmt: str) -> tuple[int, int] | None:
    """(width, height) as the header claims it, or None if the header is cut short or unknown."""
    try:
        if fmt == "jpeg":
            return _jpeg_scan(data)[0]
        if fmt == "png" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if fmt == "bmp":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(w), abs(h)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "tiff":
            return _tiff_size(data)
        if fmt == "gif":
            return struct.unpack("<HH", data[6:10])
    except struct.error:
        return None
    return None


def _is_complete(data: bytes, fmt: str) -> bool:
    """Whether the file reaches its format's end marker (a cut-short file does not)."""
    if fmt == "jpeg":
        scan = _jpeg_scan(data)[1]
        # 0xFF in entropy-coded data is always stuffed, so FFD9 after the scan start is the real end.
        return scan >= 0 and data.find(b"\xff\xd9", scan) >= 0
    if fmt == "png":
        return data.rfind(b"IEND") >= 0
    return True


def read_flag(fmt: str, dims: tuple[int, int], size: int) -> int:
    """The imdecode flag: the largest JPEG reduction keeping both sides >= size, else a full RGB decode."""
    if fmt == "jpeg":
        # min() makes the test symmetric, so EXIF rotations that swap the sides do not matter.
        for factor, flag in REDUCED_MODES:
            if min(dims) >= factor * size:
                return flag
    return cv2.IMREAD_COLOR_RGB


def decode_image(data: bytes, size: int = 256, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to (size, size, 3) uint8 RGB, or raise DecodeError.

    EXIF orientation is applied; grey, grey+alpha, RGBA, palette and 16-bit
    images become 8-bit RGB (alpha is dropped). The aspect ratio is not kept:
    the image is stretched to a square, as the seed's pipeline did.
    """
    if not data:
        raise DecodeError("empty")
    data = bytes(data)
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not_an_image", "no known image signature")
    dims = header_size(data, fmt)
    if dims is None and fmt in DECODABLE:
        raise DecodeError("truncated", f"{fmt} header cut short")
    if dims is not None:
        width, height = dims
        if width * height > max_pixels:
            raise DecodeError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
        if width == 0 or height == 0:
            raise DecodeError("not_an_image", f"{fmt} header claims {width}x{height}")
    if fmt not in DECODABLE:
        raise DecodeError("unsupported", fmt)
    if not _is_complete(data, fmt):
        raise DecodeError("truncated", f"{fmt} ends before its end marker")
    flag = read_flag(fmt, dims, size)
    try:
        # Both apply EXIF orientation; IMREAD_COLOR_RGB also drops alpha and scales 16-bit to 8-bit.
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise DecodeError("unsupported", f"{fmt}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if image is None:
        raise DecodeError("unsupported", f"OpenCV could not decode this {fmt}")
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=INTERPOLATION)
    if flag != cv2.IMREAD_COLOR_RGB:  # a reduced mode gave BGR; swapping after the resize touches fewer pixels
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image, dtype=np.uint8)
