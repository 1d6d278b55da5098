"""Line plots as PNG files with numpy and zlib only (no matplotlib, no pillow): the report's loss and LR curves.

    png = line_plot({"train": (steps, losses), "val": (steps2, vals)}, title="base: loss", xlabel="step")
    Path("loss.png").write_bytes(png)

    panels = [render_panel(...), render_panel(...)]; write_png(path, np.concatenate(panels))

The canvas is an RGB uint8 array; text uses a built-in 5x7 bitmap font (upper case, digits, a few signs).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# A 5x7 bitmap font: each glyph is 7 rows of 5 bits (the high bit is the leftmost pixel). Lower case is drawn as
# upper case.

_FONT_HEX = {
    "0": "0E11131519110E", "1": "040C040404040E", "2": "0E11010204081F", "3": "1F02040201110E",
    "4": "02060A121F0202", "5": "1F101E0101110E", "6": "0608101E11110E", "7": "1F010204080808",
    "8": "0E11110E11110E", "9": "0E11110F01020C",
    "A": "0E1111111F1111", "B": "1E11111E11111E", "C": "0E11101010110E", "D": "1C12111111121C",
    "E": "1F10101E10101F", "F": "1F10101E101010", "G": "0E11101711110F", "H": "1111111F111111",
    "I": "0E04040404040E", "J": "0702020202120C", "K": "11121418141211", "L": "1010101010101F",
    "M": "111B1515111111", "N": "11111915131111", "O": "0E11111111110E", "P": "1E11111E101010",
    "Q": "0E11111115120D", "R": "1E11111E141211", "S": "0F10100E01011E", "T": "1F040404040404",
    "U": "1111111111110E", "V": "11111111110A04", "W": "1111111515150A", "X": "11110A040A1111",
    "Y": "1111110A040404", "Z": "1F01020408101F",
    ".": "00000000000C0C", "-": "0000001F000000", "+": "0004041F040400", "_": "0000000000001F",
    "/": "00010204081000", "(": "02040808080402", ")": "08040202020408", ":": "000C0C000C0C00",
    ",": "000000000C0408", "%": "18190204081303", "=": "00001F001F0000", " ": "00000000000000",
    "x": "0000110A040A11", "@": "0E11171517100E", "#": "0A0A1F0A1F0A0A", "*": "00150E1F0E1500",
}

GLYPH_W, GLYPH_H = 5, 7


def _glyph(ch: str) -> np.ndarray:
    hexs = _FONT_HEX.get(ch) or _FONT_HEX.get(ch.upper()) or "00000000000000"
    rows = [int(hexs[i:i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(r >> (4 - c)) & 1 for c in range(GLYPH_W)] for r in rows], dtype=bool)


_GLYPHS = {ch: _glyph(ch) for ch in _FONT_HEX}

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]
WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (0, 0, 0), (110, 110, 110), (225, 225, 225)


def text_size(s: str, scale: int = 2) -> tuple[int, int]:
    return len(s) * (GLYPH_W + 1) * scale, GLYPH_H * scale


def draw_text(img: np.ndarray, x: int, y: int, s: str, color=BLACK, scale: int = 2):
    """Draw `s` with its top-left corner at (x, y); pixels outside the canvas are dropped."""
    H, W = img.shape[:2]
    for i, ch in enumerate(s):
        g = _GLYPHS.get(ch) if ch in _GLYPHS else _GLYPHS.get(ch.upper(), _GLYPHS[" "])
        if scale > 1:
            g = np.kron(g, np.ones((scale, scale), dtype=bool))
        gx = x + i * (GLYPH_W + 1) * scale
        ys, xs = np.nonzero(g)
        ys, xs = ys + y, xs + gx
        ok = (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        img[ys[ok], xs[ok]] = color


def draw_line(img: np.ndarray, xs, ys, color, width: int = 2):
    """A polyline through pixel coordinates (floats), `width` pixels thick."""
    H, W = img.shape[:2]
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) == 1:
        px, py = xs, ys
    else:
        seg = np.maximum(np.abs(np.diff(xs)), np.abs(np.diff(ys))).astype(int) + 1
        t = np.concatenate([np.linspace(0, 1, n, endpoint=False) for n in seg] + [[1.0]])
        idx = np.concatenate([np.full(n, i) for i, n in enumerate(seg)] + [[len(xs) - 2]])
        px = xs[idx] + t * (xs[idx + 1] - xs[idx])
        py = ys[idx] + t * (ys[idx + 1] - ys[idx])
    px, py = np.round(px).astype(int), np.round(py).astype(int)
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            qx, qy = px + dx, py + dy
            ok = (qx >= 0) & (qx < W) & (qy >= 0) & (qy < H)
            img[qy[ok], qx[ok]] = color


# ---------------------------------------------------------------------------------------------------------------
# Axes

def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About `n` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten; whole numbers only
    when `integer`, e.g. steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1, step)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def format_tick(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        return f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-")
    if a >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.4g}"


def render_panel(series: dict, title: str = "", xlabel: str = "step", width: int = 720, height: int = 300,
                 logy: bool = False) -> np.ndarray:
    """One plot as an RGB array (height, width, 3): each series {name: (xs, ys)} a coloured line, with a legend."""
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 78, 16, 30, 40
    pw, ph = width - left - right, height - top - bottom
    clean = {}
    for name, (x, y) in series.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        ok = np.isfinite(x) & np.isfinite(y) & ((y > 0) if logy else True)
        if ok.any():
            clean[name] = (x[ok], np.log10(y[ok]) if logy else y[ok])
    draw_text(img, left, 8, title, BLACK)
    if not clean:
        draw_text(img, left + 10, top + ph // 2, "no data", GREY)
        return img
    allx = np.concatenate([x for x, _ in clean.values()])
    ally = np.concatenate([y for _, y in clean.values()])
    x0, x1 = float(allx.min()), float(allx.max())
    y0, y1 = float(ally.min()), float(ally.max())
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.05 or (abs(y0) * 0.05 or 1.0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x):
        return left + (np.asarray(x) - x0) / (x1 - x0) * (pw - 1)

    def sy(y):
        return top + (1 - (np.asarray(y) - y0) / (y1 - y0)) * (ph - 1)

    # grid and tick labels
    for t in nice_ticks(y0, y1):
        py = int(round(float(sy(t))))
        img[py, left:left + pw] = LIGHT
        label = format_tick(10 ** t if logy else t)
        tw, th = text_size(label)
        draw_text(img, left - tw - 6, py - th // 2, label, GREY)
    for t in nice_ticks(x0, x1, 6, integer=True):
        px = int(round(float(sx(t))))
        img[top:top + ph, px] = LIGHT
        label = format_tick(t)
        tw, _ = text_size(label)
        draw_text(img, min(px - tw // 2, width - tw - 2), top + ph + 6, label, GREY)
    img[top:top + ph, left] = BLACK
    img[top + ph - 1, left:left + pw] = BLACK
    tw, _ = text_size(xlabel)
    draw_text(img, left + pw - tw, height - 16, xlabel, GREY)

    # curves (at most ~2 points per pixel column), then the legend
    for i, (name, (x, y)) in enumerate(clean.items()):
        order = np.argsort(x, kind="stable")
        x, y = x[order], y[order]
        stride = max(1, len(x) // (2 * pw))
        if stride > 1:
            x, y = np.append(x[::stride], x[-1]), np.append(y[::stride], y[-1])
        draw_line(img, sx(x), sy(y), PALETTE[i % len(PALETTE)], width=2)
    lx = left + pw - 8
    widest = max(text_size(name)[0] for name in clean)
    th = text_size("x")[1]
    box_top, box_bottom = top + 4, top + 12 + len(clean) * (th + 6)
    img[box_top:box_bottom, lx - widest - 28:left + pw - 1] = WHITE   # the legend stays readable over the curves
    for i, name in enumerate(clean):
        tw, th = text_size(name)
        ly = top + 8 + i * (th + 6)
        draw_text(img, lx - tw, ly, name, PALETTE[i % len(PALETTE)])
        img[ly + th // 2 - 1: ly + th // 2 + 1, lx - tw - 22: lx - tw - 6] = PALETTE[i % len(PALETTE)]
    return img


# ---------------------------------------------------------------------------------------------------------------
# PNG

def png_bytes(img: np.ndarray) -> bytes:
    """An RGB uint8 array (H, W, 3) as PNG file bytes (8-bit truecolour, no filtering, zlib level 9)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) array, got {img.shape}")
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def read_png(data: bytes) -> np.ndarray:
    """Decode a PNG written by `png_bytes` (8-bit RGB, filter 0) back to an array: for tests."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", 0, 0
    while pos < len(data):
        n = struct.unpack(">I", data[pos:pos + 4])[0]
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        crc = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in {kind!r}")
        if kind == b"IHDR":
            w, h = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 3)
    return raw[:, 1:].reshape(h, w, 3)


def write_png(path, img: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(img))
    return path


def line_plot(series: dict, title: str = "", xlabel: str = "step", **kw) -> bytes:
    """PNG bytes of one panel."""
    return png_bytes(render_panel(series, title, xlabel, **kw))
