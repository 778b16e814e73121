"""Image bytes -> (size, size, 3) uint8 RGB, the one decode that training and scoring share.

Pure numpy/OpenCV. The format is decided from the bytes, never the file name,
and the pixel count is read from the header *before* anything is decoded, so
a decompression bomb costs a few bytes of parsing, not gigabytes.

Formats (docs/scoring.md, "Supported images"): DECODABLE are decoded; UNSUPPORTED
are recognised by their signature and refused with reason "unsupported"; any other
bytes are "not_an_image". GIF and animated PNG/WEBP/AVIF give their first frame.

Pixel limit: MAX_PIXELS counts the pixels the decoder will produce. That is the
header's width x height, except for a single-scan (baseline) JPEG read at 1/2, 1/4
or 1/8 scale, which counts at that scale: a 9000x9000 baseline JPEG decodes at 1/8
to 1125x1125 (measured: +9 MB of memory, 0.07 s). A progressive or multi-scan JPEG
counts at full size although it is read reduced too, because libjpeg keeps every DCT
coefficient of the full image until the last scan (measured: +237 MB for the same
picture progressive; ~3 bytes per full-size pixel at 4:2:0, as much as a full decode).

Transparency: an image whose header says it has alpha (RGBA, grey+alpha, palette or
colour-key tRNS, 16-bit with alpha, GIF, AVIF, BMP with an alpha mask, TIFF with
extra samples) is decoded with its alpha and composited on BACKGROUND at full
size, before the resize, so a pixel with alpha 0 never reaches the model whatever
colour it hides, and resizing cannot bleed hidden colours into visible edges.

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

import re
import struct

import cv2
import numpy as np

REASONS = ("empty", "not_an_image", "truncated", "too_large", "unsupported")

# Decoded pixels (see the module docstring for what counts); a header claiming more is refused undecoded.
MAX_PIXELS = 50_000_000
# Bilinear, as the seed's image_dataset_from_directory; INTER_AREA is ~2.4x slower here.
INTERPOLATION = cv2.INTER_LINEAR
# White, the same level in R, G and B (_composite's arithmetic relies on it). Transparent
# face images are cut-outs, stickers and emoji made to be seen on a page, and pages,
# browsers and viewers show them on white; black would turn every cut-out into a dark
# silhouette edge the model could learn instead of the face.
BACKGROUND = 255
# Formats decoded, each with a header size check before any decode (tests/test_decode.py
# decodes a file of each, made here by OpenCV or Pillow).
DECODABLE = ("jpeg", "png", "webp", "tiff", "bmp", "gif", "avif")
# Recognised by their signature and refused as "unsupported", with the reason given.
UNSUPPORTED = {
    "heif": "HEIC/HEIF: OpenCV is built without a HEVC image decoder; convert to JPEG or PNG",
    "jpegxl": "JPEG XL: OpenCV is built without libjxl; convert to JPEG or PNG",
    "jpeg2000": "JPEG 2000 is not accepted (rare for photos; no header size check here); convert to JPEG or PNG",
    "pnm": "PNM/PAM is not accepted (no header size check here); convert to PNG",
    "pfm": "PFM (float) is not accepted; convert to PNG",
    "hdr": "Radiance HDR is not accepted; convert to PNG",
    "sunraster": "Sun raster is not accepted; convert to PNG",
}
# JPEG DCT-domain reductions, largest first. They return BGR and OpenCV 5 refuses to
# combine them with IMREAD_COLOR_RGB; they do apply EXIF orientation (checked, all 8 tags).
REDUCED_MODES = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
_FACTOR = {flag: factor for factor, flag in REDUCED_MODES}
_SEQUENTIAL_SOF = (0xC0, 0xC1, 0xC9)  # baseline, extended, arithmetic: one scan may hold all components
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1")
_PNM = re.compile(rb"P[1-6]\s+[#\d]|P7\s+(#|WIDTH|HEIGHT|DEPTH|MAXVAL|TUPLTYPE)")


class DecodeError(ValueError):
    """Why some bytes are not a usable image; `.reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _ftyp_brands(data: bytes) -> list[bytes]:
    """The major and compatible brands of an ISOBMFF file's leading ftyp box."""
    (length,) = struct.unpack(">I", data[:4])
    end = min(max(length, 16), len(data), 4096)
    return [data[8:12]] + [data[i : i + 4] for i in range(16, end - 3, 4)]


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
    if data[4:8] == b"ftyp" and len(data) >= 12:
        brands = _ftyp_brands(data)
        if any(b in _AVIF_BRANDS for b in brands):
            return "avif"
        if any(b in _HEIF_BRANDS for b in brands):
            return "heif"
    if data.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jpeg2000"
    if data.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "jpegxl"
    if data[:3] in (b"PF\n", b"Pf\n"):
        return "pfm"
    if _PNM.match(data[:16]):
        return "pnm"
    if data.startswith((b"#?RADIANCE", b"#?RGBE")):
        return "hdr"
    if data.startswith(b"\x59\xa6\x6a\x95"):
        return "sunraster"
    return None


def _jpeg_scan(data: bytes) -> tuple[tuple[int, int] | None, int, int]:
    """(width, height) and marker of the first SOF, and the offset of the scan data (-1 if none)."""
    size, sof, pos = None, 0, 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return size, sof, -1
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
            size, sof = (width, height), marker
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return size, sof, pos + 2 + length
        pos += 2 + length
    return size, sof, -1


def _jpeg_single_scan(data: bytes) -> bool:
    """A sequential JPEG with one scan: libjpeg decodes it row by row, without a full-size coefficient buffer."""
    _, sof, scan = _jpeg_scan(data)
    if sof not in _SEQUENTIAL_SOF or scan < 0:
        return False
    # 0xFF in entropy-coded data is always stuffed, so an FFDA before the first FFD9 is a real second
    # scan. Bytes after that EOI (an MPF or Ultra HDR gain-map JPEG appended) are not decoded.
    end = data.find(b"\xff\xd9", scan)
    return data.find(b"\xff\xda", scan, end if end >= 0 else len(data)) < 0


def _tiff_tags(data: bytes) -> dict[int, int]:
    """The first value of every tag in the first IFD."""
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd : ifd + 2])
    tags = {}
    for i in range(count):
        entry = data[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
        tag, kind, n = struct.unpack(order + "HHI", entry[:8])
        fmt = {3: "H", 4: "I"}.get(kind)
        if fmt is None:
            continue
        field = entry[8:12]
        if n * struct.calcsize(fmt) > 4:  # the values live at an offset
            (offset,) = struct.unpack(order + "I", field)
            field = data[offset : offset + 4]
        tags[tag] = struct.unpack(order + fmt, field[: struct.calcsize(fmt)])[0]
    return tags


def _tiff_size(data: bytes) -> tuple[int, int] | None:
    tags = _tiff_tags(data)
    return (tags[256], tags[257]) if 256 in tags and 257 in tags else None  # ImageWidth, ImageLength


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


def _boxes(data: bytes, start: int, end: int):
    """(type, payload start, box end) of each ISOBMFF box in data[start:end]; a box may end past `end`."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise struct.error("box smaller than its header")
        yield kind, pos + header, pos + size
        pos += size


def _ipma(data: bytes, start: int) -> dict[int, list[int]]:
    """Item id -> its 1-based property indices, in order, from an ipma box's payload."""
    version, flags = data[start], int.from_bytes(data[start + 1 : start + 4], "big")
    (count,) = struct.unpack(">I", data[start + 4 : start + 8])
    id_size, index_size = (2 if version < 1 else 4), (2 if flags & 1 else 1)
    mask = 0x7FFF if flags & 1 else 0x7F  # the top bit is the "essential" flag
    assoc, pos = {}, start + 8
    for _ in range(count):
        item, n = int.from_bytes(data[pos : pos + id_size], "big"), data[pos + id_size]
        pos += id_size + 1
        assoc[item] = [int.from_bytes(data[pos + index_size * j : pos + index_size * (j + 1)], "big") & mask for j in range(n)]
        pos += index_size * n
    return assoc


def _avif_info(data: bytes) -> dict:
    """What decode_image needs from an AVIF's boxes, read without decoding anything.

    complete: no top-level box runs past the end. dims: the primary item's ispe;
    pixels: the largest ispe area (grid tiles, alpha planes); transforms: the primary
    item's irot/imir, in order; depth: bits per sample (pixi, else av1C).
    """
    info = {"complete": True, "dims": None, "pixels": 0, "transforms": [], "depth": 8}
    meta = None
    for kind, start, end in _boxes(data, 0, len(data)):
        if end > len(data):
            info["complete"] = False
        if kind == b"meta" and meta is None:
            meta = (start + 4, min(end, len(data)))  # FullBox: version and flags first
    if meta is None:
        return info
    primary, props, assoc = None, [], {}
    for kind, start, end in _boxes(data, *meta):
        if kind == b"pitm":  # FullBox; item id 16-bit in version 0, else 32-bit
            primary = int.from_bytes(data[start + 4 : start + (6 if data[start] == 0 else 8)], "big")
        elif kind == b"iprp":
            for sub, s, e in _boxes(data, start, min(end, len(data))):
                if sub == b"ipco":
                    props = list(_boxes(data, s, min(e, len(data))))
                elif sub == b"ipma":
                    assoc = _ipma(data, s)
    for kind, start, end in props:
        if kind == b"ispe":
            w, h = struct.unpack(">II", data[start + 4 : start + 12])
            info["pixels"] = max(info["pixels"], w * h)
    primary_props = [props[i - 1] for i in assoc.get(primary, []) if 1 <= i <= len(props)]
    for kind, start, end in primary_props:
        if kind == b"ispe":
            info["dims"] = struct.unpack(">II", data[start + 4 : start + 12])
        elif kind == b"irot":
            info["transforms"].append(("irot", data[start] & 3))
        elif kind == b"imir":
            info["transforms"].append(("imir", data[start] & 1))
        elif kind == b"pixi" and data[start + 4] >= 1:
            info["depth"] = data[start + 5]
        elif kind == b"av1C" and not any(k == b"pixi" for k, _, _ in primary_props):
            high_bitdepth, twelve_bit = data[start + 2] & 0x40, data[start + 2] & 0x20
            info["depth"] = 12 if high_bitdepth and twelve_bit else 10 if high_bitdepth else 8
    return info


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
            return struct.unpack("<HH", data[6:10])  # the canvas; OpenCV refuses frames outside it
        if fmt == "avif":
            return _avif_info(data)["dims"]
    except (struct.error, IndexError):
        return None
    return None


def _is_complete(data: bytes, fmt: str) -> bool:
    """Whether the file reaches its format's end marker (a cut-short file does not)."""
    if fmt == "jpeg":
        scan = _jpeg_scan(data)[2]
        # 0xFF in entropy-coded data is always stuffed, so FFD9 after the scan start is the real end.
        return scan >= 0 and data.find(b"\xff\xd9", scan) >= 0
    if fmt == "png":
        return data.rfind(b"IEND") >= 0
    if fmt == "webp":
        return len(data) >= int.from_bytes(data[4:8], "little") + 8  # the RIFF size
    return True


def _png_transparency(data: bytes) -> tuple[bool, int | None]:
    """(has alpha, grey colour key). A grey PNG's tRNS key is ignored by OpenCV, so we apply it."""
    colour_type, bit_depth = data[25], data[24]
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            break
        if kind == b"tRNS":
            if colour_type == 0 and length >= 2:
                (key,) = struct.unpack(">H", data[pos + 8 : pos + 10])
                # OpenCV expands 1, 2 and 4-bit grey to 0-255 (x255, x85, x17); 8 and 16-bit stay as stored.
                return True, key * (255 // ((1 << bit_depth) - 1)) if bit_depth < 8 else key
            return True, None
        pos += 12 + length
    return colour_type in (4, 6), None


def _has_alpha(data: bytes, fmt: str) -> bool:
    """Whether the header says the image may have transparent pixels (then it takes the alpha path)."""
    try:
        if fmt == "png":
            return _png_transparency(data)[0]
        if fmt == "webp":
            chunk = data[12:16]
            if chunk == b"VP8X":
                return bool(data[20] & 0x10)
            return chunk == b"VP8L" and bool(int.from_bytes(data[21:25], "little") >> 28 & 1)
        if fmt == "tiff":
            tags = _tiff_tags(data)
            return 338 in tags or (tags.get(277, 1) in (2, 4) and tags.get(262) in (0, 1, 2))  # ExtraSamples; grey+A, RGBA
        if fmt == "bmp":
            (header,), (bpp,), (compression,) = struct.unpack("<I", data[14:18]), struct.unpack("<H", data[28:30]), struct.unpack("<I", data[30:34])
            # Only an explicit alpha mask (V4/V5 header, BI_BITFIELDS): the fourth byte of a plain
            # 32-bit BMP is padding, often 0, and OpenCV would hand it over as alpha.
            return bpp == 32 and compression == 3 and header >= 56 and struct.unpack("<I", data[66:70])[0] == 0xFF000000
    except (struct.error, IndexError):
        return False
    return fmt in ("gif", "avif")  # GIF: transparent index or a first frame smaller than the canvas


def _exif_orientation(blob: bytes) -> int:
    """Tag 0x0112 of an EXIF block (TIFF layout), 1 if absent or unreadable."""
    try:
        if blob.startswith(b"Exif\x00\x00"):
            blob = blob[6:]
        order = {b"II": "<", b"MM": ">"}.get(blob[:2])
        if order is None:
            return 1
        (ifd,) = struct.unpack(order + "I", blob[4:8])
        (count,) = struct.unpack(order + "H", blob[ifd : ifd + 2])
        for i in range(count):
            tag, kind = struct.unpack(order + "HH", blob[ifd + 2 + 12 * i : ifd + 6 + 12 * i])
            if tag == 0x0112 and kind == 3:
                (value,) = struct.unpack(order + "H", blob[ifd + 10 + 12 * i : ifd + 12 + 12 * i])
                return value if 1 <= value <= 8 else 1
    except struct.error:
        pass
    return 1


def _orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation, exactly as OpenCV's own ApplyExifOrientation does it."""
    if orientation in (5, 6, 7, 8):
        image = cv2.transpose(image)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    return image if flip is None else cv2.flip(image, flip)


def _avif_transform(image: np.ndarray, transforms: list) -> np.ndarray:
    """irot (anticlockwise quarter turns) and imir (0: top and bottom exchanged, 1: left and right;
    ISO/IEC 23008-12:2022, the 2017 text had it inverted), in the order the file associates them.

    OpenCV 5.1 ignores both (it applies an AVIF's EXIF orientation instead, which the
    HEIF spec says irot/imir replace), so an AVIF is always decoded with orientation off.
    """
    for kind, value in transforms:
        if kind == "irot" and value:
            image = cv2.rotate(image, {1: cv2.ROTATE_90_COUNTERCLOCKWISE, 2: cv2.ROTATE_180, 3: cv2.ROTATE_90_CLOCKWISE}[value])
        elif kind == "imir":
            image = cv2.flip(image, value)  # cv2.flip: 0 flips top-bottom, 1 left-right
    return image


def _composite(colour: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    """8-bit colour over white by 8-bit alpha, in place, a band of rows at a time (bounded temporaries).

    c * a / 255 + 255 * (255 - a) / 255 = round(c * a / 255) + (255 - a), exactly, on white:
    alpha 0 gives 255 whatever c is, alpha 255 gives c. A premultiplied c already holds c * a.
    """
    rows = max(1, (1 << 20) // colour.shape[1])
    for top in range(0, colour.shape[0], rows):
        c, a = colour[top : top + rows], alpha[top : top + rows]
        if c.ndim == 3:
            a = cv2.merge([a] * c.shape[2])
        if not premultiplied:
            cv2.multiply(c, a, dst=c, scale=1 / 255)  # rounds to nearest; c * a / 255 is never a half
        cv2.add(c, BACKGROUND - a, dst=c)  # saturates, for premultiplied colours that exceed their alpha
    return colour


def _decode_with_alpha(data: bytes, fmt: str, avif: dict | None) -> np.ndarray | None:
    """Decode keeping alpha, composite on BACKGROUND, orient: 8-bit BGR or grey at full size."""
    buf = np.frombuffer(data, np.uint8)
    if hasattr(cv2, "imdecodeWithMetadata"):
        image, types, metadata = cv2.imdecodeWithMetadata(buf, cv2.IMREAD_UNCHANGED)
        exif = next((np.asarray(m).tobytes() for t, m in zip(types, metadata) if t == cv2.IMAGE_METADATA_EXIF), b"")
    else:  # older OpenCV: no EXIF from an IMREAD_UNCHANGED decode
        image, exif = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), b""
    if image is None or image.size == 0:
        return None
    if image.dtype not in (np.uint8, np.uint16):
        raise DecodeError("unsupported", f"{fmt} with {image.dtype} samples")
    key_alpha = None
    if fmt == "png" and image.ndim == 2:
        key = _png_transparency(data)[1]
        if key is not None:  # OpenCV drops a grey PNG's colour key: pixels equal to it are transparent
            key_alpha = np.where(image == key, 0, 255).astype(np.uint8)
    sixteen_bit = image.dtype == np.uint16
    if sixteen_bit:
        # AVIF's 10/12-bit samples arrive unscaled; every other 16-bit image uses the full range.
        image = cv2.convertScaleAbs(image, alpha=255 / ((1 << avif["depth"]) - 1 if fmt == "avif" else 65535))
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels in (1, 3):
        colour, alpha = image, key_alpha
    elif channels == 2:
        colour, alpha = cv2.extractChannel(image, 0), cv2.extractChannel(image, 1)
    else:
        colour, alpha = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR), cv2.extractChannel(image, 3)
    if fmt == "bmp" and alpha is not None and not alpha.any():
        alpha = None  # all-zero alpha in a BMP is unused padding, as browsers treat it
    if alpha is not None:
        # Associated alpha is premultiplied in the file; libtiff premultiplies unassociated alpha
        # on OpenCV's 8-bit read path (RGBA strips), not on its 16-bit path.
        extra = _tiff_tags(data).get(338) if fmt == "tiff" else None
        premultiplied = extra == 1 or (extra == 2 and not sixteen_bit)
        colour = _composite(colour, alpha, premultiplied)
    if fmt in ("png", "webp"):  # OpenCV orients these only outside IMREAD_UNCHANGED; TIFF's decoder orients itself
        colour = _orient(colour, _exif_orientation(exif))
    elif fmt == "avif":
        colour = _avif_transform(colour, avif["transforms"])
    return colour


def read_flag(fmt: str, dims: tuple[int, int], size: int) -> int:
    """The imdecode flag: the largest JPEG reduction keeping both sides >= size, else a full RGB decode."""
    if fmt == "jpeg":
        # min() makes the test symmetric, so EXIF rotations that swap the sides do not matter.
        for factor, flag in REDUCED_MODES:
            if min(dims) >= factor * size:
                return flag
    return cv2.IMREAD_COLOR_RGB


def _megapixels(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.1f}" if mp >= 10 else f"{mp:.2f}" if mp >= 0.01 else f"{mp:.2g}"


def _check_pixels(data: bytes, fmt: str, dims: tuple[int, int], flag: int, max_pixels: int, pixels: int) -> None:
    """Raise too_large if the decoder would produce more than max_pixels (see the module docstring)."""
    if pixels <= max_pixels:
        return
    width, height = dims
    limit = f"over the {max_pixels / 1e6:g} MP limit on decoded pixels"
    if fmt != "jpeg" or flag not in _FACTOR:
        raise DecodeError("too_large", f"{fmt} {width}x{height} decodes to {_megapixels(pixels)} MP, {limit}")
    if not _jpeg_single_scan(data):
        raise DecodeError(
            "too_large",
            f"progressive or multi-scan jpeg {width}x{height} counts at full size, {_megapixels(pixels)} MP "
            f"(its decoder holds every coefficient), {limit}",
        )
    factor = _FACTOR[flag]
    reduced_w, reduced_h = -(-width // factor), -(-height // factor)
    if reduced_w * reduced_h > max_pixels:
        raise DecodeError(
            "too_large",
            f"jpeg {width}x{height} decodes at 1/{factor} to {reduced_w}x{reduced_h}, "
            f"{_megapixels(reduced_w * reduced_h)} MP, {limit}",
        )


def decode_image(data: bytes, size: int = 256, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode any supported image to (size, size, 3) uint8 RGB, or raise DecodeError.

    EXIF orientation (an AVIF's irot/imir) is applied; grey, palette and 16-bit
    images become 8-bit RGB; transparent pixels are composited on BACKGROUND
    (white). The aspect ratio is not kept: the image is stretched to a square,
    as the seed's pipeline did.
    """
    if not data:
        raise DecodeError("empty")
    data = bytes(data)
    fmt = sniff_format(data)
    if fmt is None:
        raise DecodeError("not_an_image", "no known image signature")
    if fmt in UNSUPPORTED:
        raise DecodeError("unsupported", UNSUPPORTED[fmt])
    avif = None
    if fmt == "avif":
        try:
            avif = _avif_info(data)
        except (struct.error, IndexError):
            raise DecodeError("truncated", "avif boxes cut short") from None
        if not avif["complete"]:
            raise DecodeError("truncated", "avif ends inside a box")
        if avif["dims"] is None:
            raise DecodeError("unsupported", "avif without a still image item (an image sequence only)")
    dims = avif["dims"] if avif else header_size(data, fmt)
    if dims is None:
        raise DecodeError("truncated", f"{fmt} header cut short")
    width, height = dims
    if width == 0 or height == 0:
        raise DecodeError("not_an_image", f"{fmt} header claims {width}x{height}")
    flag = read_flag(fmt, dims, size)
    _check_pixels(data, fmt, dims, flag, max_pixels, max(width * height, avif["pixels"] if avif else 0))
    if not _is_complete(data, fmt):
        raise DecodeError("truncated", f"{fmt} ends before its end marker")
    alpha_path = _has_alpha(data, fmt)
    try:
        if alpha_path:
            image = _decode_with_alpha(data, fmt, avif)
        else:
            # Both apply EXIF orientation; IMREAD_COLOR_RGB also scales 16-bit to 8-bit.
            image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise DecodeError("unsupported", f"{fmt}: {exc.msg if hasattr(exc, 'msg') else exc}") from None
    if image is None:
        if fmt == "gif" and not data.endswith(b"\x3b"):  # OpenCV walks every frame to the trailer first
            raise DecodeError("truncated", "gif ends before its trailer")
        raise DecodeError("unsupported", f"OpenCV could not decode this {fmt}")
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=INTERPOLATION)
    # A reduced mode or the alpha path gave BGR (or grey); converting after the resize touches fewer pixels.
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif alpha_path or flag != cv2.IMREAD_COLOR_RGB:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image, dtype=np.uint8)
