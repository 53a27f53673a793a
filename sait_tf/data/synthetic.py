"""The embedded synthetic domain pair: street scenes in the GTA5 or SYNTHIA and Cityscapes layouts.

Both domains draw their label layouts from one distribution (``sample_layout``: horizon,
road trapezoid, sidewalks, terrain, fences or walls, buildings and trees along the horizon,
sky, cars, persons, poles with signs or lights, a few void pixels). They differ only in
appearance (``render``): the target draws every class's source colour through one camera
response (``camera_response``: a hue turn, a gamma and white-balance gains), paints other
textures, and adds a per-image tint, a vertical illumination gradient, stronger noise and a
slight blur (``Camera``: ``EMBEDDED_CAMERA`` by default, ``Camera.random(seed)`` draws
others). The response moves most classes near another class's source colour, so a segmenter
trained on the source relies on the wrong cues, while a translator that learns the camera's
look recovers most of the gap (docs/synthetic.md has the measurements).

    python -m sait_tf.data.synthetic --out DIR --seed 0

writes ``DIR/source`` (GTA5 layout: ``images/00001.png``, palette ``labels/00001.png`` whose
index is the Cityscapes labelId; or with ``--source_layout synthia`` SYNTHIA-RAND-CITYSCAPES:
``RGB/0000000.png``, 16-bit ``GT/LABELS/0000000.png``), ``DIR/target`` (Cityscapes layout:
``leftImg8bit`` and ``gtFine/*_gtFine_labelIds.png`` for train and val) and
``DIR/synthetic.json`` (the parameters). The same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import struct
import zlib

import gin
import numpy as np
from PIL import Image

from sait_tf import labels
from sait_tf.runtime.progress import Progress

DOMAINS = ("source", "target")
DEFAULT_SIZE = (64, 128)  # (height, width)
TRAIN_CITIES = ("synthberg", "pixelheim")
VAL_CITIES = ("renderdorf",)
MANIFEST_NAME = "synthetic.json"
_FRAME = 19  # Cityscapes annotates the 20th frame of each sequence: CITY_SEQ_000019.

# Cityscapes labelIds drawn by the layout generator.
UNLABELED, EGO_VEHICLE, STATIC, GROUND = 0, 1, 4, 6
ROAD, SIDEWALK, BUILDING, WALL, FENCE = 7, 8, 11, 12, 13
POLE, TRAFFIC_SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 17, 20, 21, 22, 23, 24, 26
VOID_LABEL_IDS = (UNLABELED, EGO_VEHICLE, STATIC, GROUND)
DRAWN_LABEL_IDS = (ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_SIGN, VEGETATION, TERRAIN,
                   SKY, PERSON, CAR)
DRAWN_TRAIN_IDS = tuple(int(labels.LABEL_ID_TO_TRAIN_ID[i]) for i in DRAWN_LABEL_IDS)


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """How one domain paints a layout.

    ``class_looks`` maps a labelId to (RGB colour, texture name, texture amplitude); void
    labelIds get a random grey per image. Illumination multiplies the image by
    ``brightness * tint * (1 + gradient * (row / H - 0.5))``, each drawn per image from the
    given ranges; ``colour_jitter`` is the per-image, per-class colour standard deviation.
    """

    class_looks: dict[int, tuple[tuple[int, int, int], str, float]]
    colour_jitter: float
    brightness: tuple[float, float]
    tint: tuple[float, float]
    gradient: tuple[float, float]
    noise_std: float
    blur_sigma: float


# The source ("game") look of each class: saturated flat colours, windows on buildings.
_SOURCE_LOOKS = {
    ROAD: ((90, 90, 100), "flat", 0.0),
    SIDEWALK: ((175, 150, 125), "flat", 0.0),
    BUILDING: ((150, 80, 60), "windows", 0.25),
    WALL: ((200, 190, 150), "flat", 0.0),
    FENCE: ((120, 95, 55), "vstripes", 0.2),
    POLE: ((60, 60, 60), "flat", 0.0),
    TRAFFIC_SIGN: ((220, 40, 40), "flat", 0.0),
    VEGETATION: ((50, 140, 50), "grain", 0.1),
    TERRAIN: ((150, 180, 80), "flat", 0.0),
    SKY: ((120, 180, 240), "flat", 0.0),
    PERSON: ((205, 105, 160), "flat", 0.0),
    CAR: ((40, 60, 180), "flat", 0.0),
}
# Bumped whenever the appearance model changes, so a pair drawn by an older version is
# recognised by ``ensure_synthetic_pair`` instead of silently reused.
APPEARANCE_VERSION = 2


def camera_response(rgb: tuple[int, int, int], hue_degrees: float, gamma: float,
                    gains: tuple[float, float, float]) -> tuple[int, int, int]:
    """A camera's rendering of a source colour (RGB 0..255 in and out).

    The hue turns by ``hue_degrees`` about the grey axis (Rodrigues' rotation), then each
    channel gets ``gamma`` and its white-balance gain; the result is clipped to 0..255.
    """
    angle = np.deg2rad(hue_degrees)
    axis = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]],
                      [-axis[1], axis[0], 0.0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross
    unit = np.clip(rotation @ (np.asarray(rgb, np.float64) / 255.0), 0.0, 1.0)
    graded = np.clip(255.0 * unit ** gamma * np.asarray(gains), 0.0, 255.0)
    return tuple(int(v) for v in np.round(graded))


# The ranges ``Camera.random`` draws from, each uniformly and independently (fixed before any
# demo ran on a random camera; docs/synthetic.md). Hue: a magnitude and a random sign, at
# least 30 degrees so that every camera leaves a gap to close. Gains: red and blue, green
# stays 1. Tint and gradient: the half-width of a range centred on 1 and 0. Textures: one of
# ``RANDOM_TEXTURES`` per class with an amplitude from "texture_amplitude".
RANDOM_CAMERA_RANGES: dict[str, tuple[float, float]] = {
    "hue_magnitude_degrees": (30.0, 60.0),
    "gamma": (0.8, 1.4),
    "gain_red_blue": (0.7, 1.3),
    "colour_jitter": (10.0, 20.0),
    "brightness_low": (0.75, 0.9),
    "brightness_high": (1.05, 1.2),
    "tint_half_width": (0.06, 0.15),
    "gradient_half_width": (0.1, 0.4),
    "noise_std": (3.0, 9.0),
    "blur_sigma": (0.4, 1.0),
    "texture_amplitude": (0.05, 0.3),
}
# The textures ``_texture`` paints. The source's building windows are left out of the random
# ones: they stay a mark of the source domain.
_TEXTURE_NAMES = ("flat", "grain", "blotch", "hstripes", "vstripes", "tiles", "windows")
RANDOM_TEXTURES = _TEXTURE_NAMES[:-1]


@dataclasses.dataclass(frozen=True)
class Camera:
    """The target domain's appearance: how a camera renders the source's scene.

    Every class's source colour goes through ``camera_response(colour, hue_degrees, gamma,
    gains)``; ``textures`` holds (labelId, texture name, amplitude) per drawn class; the
    other fields are those of ``DomainStyle``. Hashable, so it can key caches.
    """

    hue_degrees: float
    gamma: float
    gains: tuple[float, float, float]
    textures: tuple[tuple[int, str, float], ...]
    colour_jitter: float
    brightness: tuple[float, float]
    tint: tuple[float, float]
    gradient: tuple[float, float]
    noise_std: float
    blur_sigma: float

    def __post_init__(self) -> None:
        drawn = sorted(label_id for label_id, _, _ in self.textures)
        if drawn != sorted(DRAWN_LABEL_IDS):
            raise ValueError(f"textures must name each drawn labelId {DRAWN_LABEL_IDS} once, "
                             f"got {tuple(drawn)}")
        unknown = {name for _, name, _ in self.textures} - set(_TEXTURE_NAMES)
        if unknown:
            raise ValueError(f"textures name unknown textures {sorted(unknown)}; "
                             f"expected some of {_TEXTURE_NAMES}")

    def style(self) -> DomainStyle:
        """The ``DomainStyle`` that paints the target domain through this camera."""
        textures = {label_id: (name, amplitude) for label_id, name, amplitude in self.textures}
        return DomainStyle(
            class_looks={label_id: (camera_response(colour, self.hue_degrees, self.gamma,
                                                    self.gains), *textures[label_id])
                         for label_id, (colour, _, _) in _SOURCE_LOOKS.items()},
            colour_jitter=self.colour_jitter, brightness=self.brightness, tint=self.tint,
            gradient=self.gradient, noise_std=self.noise_std, blur_sigma=self.blur_sigma)

    def to_json(self) -> dict:
        """The fields as JSON values (lists for tuples), as ``synthetic.json`` records them."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def random(cls, seed: int) -> Camera:
        """A camera drawn uniformly from ``RANDOM_CAMERA_RANGES``; the same seed, the same camera.

        Values are rounded to 3 decimals so that tables and manifests stay readable.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        rng = np.random.default_rng(int(seed))

        def draw(name: str) -> float:
            return round(float(rng.uniform(*RANDOM_CAMERA_RANGES[name])), 3)

        hue = draw("hue_magnitude_degrees") * (1.0 if rng.uniform() < 0.5 else -1.0)
        gamma = draw("gamma")
        gains = (draw("gain_red_blue"), 1.0, draw("gain_red_blue"))
        textures = tuple((label_id, RANDOM_TEXTURES[rng.integers(len(RANDOM_TEXTURES))],
                          draw("texture_amplitude")) for label_id in DRAWN_LABEL_IDS)
        tint, gradient = draw("tint_half_width"), draw("gradient_half_width")
        return cls(hue_degrees=hue, gamma=gamma, gains=gains, textures=textures,
                   colour_jitter=draw("colour_jitter"),
                   brightness=(draw("brightness_low"), draw("brightness_high")),
                   tint=(round(1.0 - tint, 3), round(1.0 + tint, 3)),
                   gradient=(-gradient, gradient),
                   noise_std=draw("noise_std"), blur_sigma=draw("blur_sigma"))


# The embedded target camera: hue turned 45 degrees about the grey axis, gamma 1.25 and
# white-balance gains with a cool cast, so most classes land near another class's source
# colour; other textures, a per-image tint and vertical light gradient, more noise, a slight
# blur. docs/synthetic.md measures the gap it makes.
EMBEDDED_CAMERA = Camera(
    hue_degrees=45.0,
    gamma=1.25,
    gains=(0.7, 1.0, 1.3),
    textures=((ROAD, "grain", 0.12), (SIDEWALK, "tiles", 0.15), (BUILDING, "vstripes", 0.15),
              (WALL, "grain", 0.1), (FENCE, "vstripes", 0.25), (POLE, "flat", 0.0),
              (TRAFFIC_SIGN, "flat", 0.0), (VEGETATION, "blotch", 0.3), (TERRAIN, "grain", 0.15),
              (SKY, "blotch", 0.06), (PERSON, "flat", 0.0), (CAR, "hstripes", 0.15)),
    colour_jitter=15.0,
    brightness=(0.8, 1.15),
    tint=(0.88, 1.12),
    gradient=(-0.3, 0.3),
    noise_std=6.0,
    blur_sigma=0.7,
)

STYLES: dict[str, DomainStyle] = {
    # A game-like look: saturated flat colours, windows on buildings, even light, sharp edges.
    "source": DomainStyle(
        class_looks=_SOURCE_LOOKS,
        colour_jitter=25.0,
        brightness=(0.8, 1.2),
        tint=(0.9, 1.1),
        gradient=(0.0, 0.0),
        noise_std=3.0,
        blur_sigma=0.0,
    ),
    # A camera-like look: the embedded camera.
    "target": EMBEDDED_CAMERA.style(),
}


# ---------------------------------------------------------------------------------------------
# Label layouts.


def _check_size(size: tuple[int, int], name: str = "size") -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"{name} must be (height, width), got {size}")
    height, width = (int(v) for v in size)
    if height < 16 or width < 16:
        raise ValueError(f"{name} must be (height, width) with both >= 16, got {size}")
    return height, width


def sample_layout(rng: np.random.Generator, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """Draws one street-scene label map [H, W] of Cityscapes labelIds (uint8).

    A pinhole view of a flat road: every ground edge is a ray from the vanishing point, and
    objects standing on the ground at row ``y`` are ``y - horizon`` pixels tall per unit of
    camera height, drawn far to near.
    """
    height, width = _check_size(size)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    layout = np.full((height, width), SKY, dtype=np.uint8)
    horizon = height * rng.uniform(0.36, 0.5)
    vanish_x = width * rng.uniform(0.4, 0.6)
    ground_h = height - horizon

    _draw_skyline(layout, rng, xs, ys, horizon)

    road_left = width * rng.uniform(-0.2, 0.25)
    road_right = width * rng.uniform(0.75, 1.2)
    walk_left = road_left - width * rng.uniform(0.2, 0.6)
    walk_right = road_right + width * rng.uniform(0.2, 0.6)
    below = ys >= horizon
    depth = np.clip((ys - horizon) / ground_h, 0.0, None)  # 0 at the horizon, 1 at the bottom

    def edge_x(bottom_x: float, depth_fraction: np.ndarray) -> np.ndarray:
        return vanish_x + (bottom_x - vanish_x) * depth_fraction

    layout[below] = SIDEWALK
    for side, outer in ((0, walk_left), (1, walk_right)):
        if rng.uniform() < 0.5:
            beyond = xs < edge_x(outer, depth) if side == 0 else xs > edge_x(outer, depth)
            layout[below & beyond] = TERRAIN
    road = below & (xs >= edge_x(road_left, depth)) & (xs <= edge_x(road_right, depth))
    layout[road] = ROAD

    if rng.uniform() < 0.3:  # a flat void patch on the road surface
        row = horizon + ground_h * rng.uniform(0.3, 0.9)
        scale = row - horizon
        centre = vanish_x + (rng.uniform(road_left, road_right) - vanish_x) * scale / ground_h
        patch = ((xs - centre) / (0.6 * scale)) ** 2 + ((ys - row) / (0.07 * scale + 0.5)) ** 2
        layout[(patch < 1.0) & road] = GROUND

    for side, outer in ((0, walk_left), (1, walk_right)):
        _draw_side_barrier(layout, rng, xs, ys, horizon, vanish_x, ground_h, outer, side)

    objects = []
    for _ in range(rng.integers(0, 5)):
        objects.append((rng.uniform(0.1, 1.05), CAR, rng.uniform(0.1, 0.9)))
    for _ in range(rng.integers(0, 5)):
        objects.append((rng.uniform(0.1, 1.05), PERSON, rng.uniform(0.1, 0.9)))
    for _ in range(rng.integers(1, 4)):
        objects.append((rng.uniform(0.1, 1.0), POLE, rng.uniform(0.6, 1.0)))
    for _ in range(rng.integers(0, 3)):
        objects.append((rng.uniform(0.1, 1.0), STATIC, rng.uniform(0.2, 0.9)))
    objects.sort(key=lambda item: item[0])
    for rel_depth, kind, lateral in objects:
        row = horizon + ground_h * rel_depth
        scale = row - horizon
        if kind == CAR:  # lateral position across the road
            left, right = road_left, road_right
        elif rng.uniform() < 0.5:  # on a sidewalk, lateral position from the road edge outwards
            left, right = road_left, walk_left
        else:
            left, right = road_right, walk_right
        bottom_x = left + (right - left) * lateral
        x = vanish_x + (bottom_x - vanish_x) * rel_depth
        _draw_object(layout, rng, xs, ys, kind, x, row, scale)

    if rng.uniform() < 0.3:
        hood = height * rng.uniform(0.05, 0.12) * (1.0 - 0.5 * ((xs - width / 2) / width) ** 2)
        layout[ys > height - hood] = EGO_VEHICLE
    return layout


def _draw_skyline(layout: np.ndarray, rng: np.random.Generator, xs: np.ndarray,
                  ys: np.ndarray, horizon: float) -> None:
    """Buildings and tree rows standing on the horizon, left to right, with sky gaps."""
    height, width = layout.shape
    x0 = -width * rng.uniform(0.0, 0.1)
    while x0 < width:
        block_w = width * rng.uniform(0.06, 0.22)
        columns = (xs >= x0) & (xs < x0 + block_w)
        kind = rng.choice(3, p=(0.55, 0.33, 0.12))
        if kind == 0:
            top = horizon - height * rng.uniform(0.08, 0.42)
            layout[columns & (ys >= top)] = BUILDING
        elif kind == 1:
            crown = height * rng.uniform(0.08, 0.3)
            waves = rng.uniform(1.0, 3.0) * 2 * np.pi / block_w
            top = horizon - crown * (0.75 + 0.25 * np.cos(waves * (xs - x0) + rng.uniform(0, 6.3)))
            layout[columns & (ys >= top)] = VEGETATION
        x0 += block_w


def _draw_side_barrier(layout: np.ndarray, rng: np.random.Generator, xs: np.ndarray,
                       ys: np.ndarray, horizon: float, vanish_x: float, ground_h: float,
                       outer_bottom_x: float, side: int) -> None:
    """A fence (low) or wall (taller than the camera) along one sidewalk's outer edge.

    In slope space ``s = (y - horizon) / |vanish_x - x|`` the edge is ``s = s_edge`` and the
    top of a barrier ``k`` camera heights tall is ``s = (1 - k) * s_edge``.
    """
    choice = rng.uniform()
    if choice >= 0.55:
        return
    lateral = abs(vanish_x - outer_bottom_x)
    s_edge = ground_h / max(lateral, 1e-3)
    relative_height = rng.uniform(0.3, 0.6) if choice < 0.35 else rng.uniform(1.3, 2.5)
    label = FENCE if choice < 0.35 else WALL
    offset = (vanish_x - xs) if side == 0 else (xs - vanish_x)
    slope = (ys - horizon) / np.maximum(offset, 1e-3)
    barrier = (offset > 1.0) & (slope < s_edge) & (slope >= (1.0 - relative_height) * s_edge)
    layout[barrier] = label


def _draw_object(layout: np.ndarray, rng: np.random.Generator, xs: np.ndarray,
                 ys: np.ndarray, kind: int, x: float, row: float, scale: float) -> None:
    """Draws a car, person, pole (with a sign or a light) or static box standing at (x, row)."""
    if kind == CAR:
        half_w = 0.6 * scale * rng.uniform(0.9, 1.15)
        body = (np.abs(xs - x) < half_w) & (ys <= row) & (ys > row - 0.5 * scale)
        cabin = (np.abs(xs - x) < 0.75 * half_w) & (ys <= row - 0.45 * scale) & (
            ys > row - 0.9 * scale)
        layout[body | cabin] = CAR
    elif kind == PERSON:
        tall = scale * rng.uniform(0.95, 1.2)
        body = ((xs - x) / (0.15 * tall + 0.5)) ** 2 + ((ys - (row - 0.42 * tall)) / (
            0.42 * tall)) ** 2 < 1.0
        head = ((xs - x) ** 2 + (ys - (row - 0.9 * tall)) ** 2) < (0.09 * tall + 0.5) ** 2
        layout[body | head] = PERSON
    elif kind == POLE:
        top = row - 1.6 * scale * rng.uniform(0.85, 1.15)
        half_w = max(0.75, 0.035 * scale)
        layout[(np.abs(xs - x) < half_w) & (ys <= row) & (ys > top)] = POLE
        if rng.uniform() < 0.7:
            sign = (np.abs(xs - x) < 0.18 * scale + 0.5) & (ys > top) & (ys <= top + 0.3 * scale)
            layout[sign] = TRAFFIC_SIGN
    else:
        half_w = 0.18 * scale * rng.uniform(0.8, 1.4) + 0.5
        layout[(np.abs(xs - x) < half_w) & (ys <= row) & (ys > row - 0.3 * scale)] = STATIC


# ---------------------------------------------------------------------------------------------
# Appearance.


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Value noise in [-1, 1]: a coarse random grid bilinearly interpolated to [H, W]."""
    grid = rng.uniform(-1.0, 1.0, (int(height / cell) + 2, int(width / cell) + 2))
    gy = np.arange(height) / cell
    gx = np.arange(width) / cell
    y0, x0 = gy.astype(int), gx.astype(int)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture(name: str, rng: np.random.Generator, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """A zero-mean-ish modulation field in about [-1, 1] for the whole image."""
    height, width = ys.shape
    if name == "flat":
        return np.zeros_like(ys)
    if name == "grain":
        return np.clip(rng.normal(0.0, 0.5, ys.shape), -1.0, 1.0)
    if name == "blotch":
        return _smooth_noise(rng, height, width, rng.uniform(3.0, 6.0))
    if name == "hstripes":
        return np.sign(np.sin(2 * np.pi * ys / rng.uniform(3.0, 5.0) + rng.uniform(0, 6.3)))
    if name == "vstripes":
        return np.sign(np.sin(2 * np.pi * xs / rng.uniform(3.0, 5.0) + rng.uniform(0, 6.3)))
    if name == "tiles":
        period = rng.uniform(4.0, 7.0)
        return np.sign(np.sin(np.pi * xs / period) * np.sin(np.pi * ys / period))
    if name == "windows":
        px, py = rng.uniform(4.0, 7.0), rng.uniform(5.0, 8.0)
        inside = ((xs + rng.uniform(0, px)) % px < 0.5 * px) & ((ys % py) < 0.5 * py)
        return np.where(inside, -1.0, 0.3)
    raise ValueError(f"unknown texture {name!r}")


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an [H, W, 3] float image with edge padding."""
    if sigma <= 0:
        return image
    radius = max(1, int(np.ceil(2 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    height, width = image.shape[:2]
    padded = np.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    image = sum(w * padded[i:i + height] for i, w in enumerate(taps))
    padded = np.pad(image, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[:, i:i + width] for i, w in enumerate(taps))


def render(layout_label_ids: np.ndarray, domain: str | DomainStyle,
           rng: np.random.Generator) -> np.ndarray:
    """Paints a labelId map [H, W] in the appearance of ``domain``; returns uint8 RGB [H, W, 3].

    ``domain`` is "source", "target" or a ``DomainStyle`` (e.g. source textures with target
    colours, to study what a translator must learn).
    """
    if isinstance(domain, str) and domain not in STYLES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    style = STYLES[domain] if isinstance(domain, str) else domain
    layout = np.asarray(layout_label_ids)
    if layout.ndim != 2:
        raise ValueError(f"layout_label_ids must be [H, W], got shape {layout.shape}")
    ys, xs = np.mgrid[0:layout.shape[0], 0:layout.shape[1]].astype(np.float32)
    image = np.zeros(layout.shape + (3,), dtype=np.float32)
    for label_id in np.unique(layout):
        mask = layout == label_id
        if int(label_id) in style.class_looks:
            colour, texture, amplitude = style.class_looks[int(label_id)]
            colour = np.asarray(colour, np.float32) + rng.normal(0.0, style.colour_jitter, 3)
        else:  # void: a random grey
            colour, texture, amplitude = np.full(3, rng.uniform(30, 200), np.float32), "grain", 0.1
        shade = 1.0 + amplitude * _texture(texture, rng, ys, xs)[mask]
        image[mask] = shade[:, None] * colour[None, :]
    gain = rng.uniform(*style.brightness) * rng.uniform(*style.tint, size=3)
    gradient = 1.0 + rng.uniform(*style.gradient) * (ys / layout.shape[0] - 0.5)
    image *= gradient[..., None] * gain[None, None, :]
    image = _blur(image, style.blur_sigma)
    image += rng.normal(0.0, style.noise_std, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _style(domain: str, camera: Camera | None) -> DomainStyle:
    if domain not in STYLES:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if camera is not None and not isinstance(camera, Camera):
        raise ValueError(f"camera must be a Camera or None, got {camera!r}")
    if domain == "target" and camera is not None:
        return camera.style()
    return STYLES[domain]


@functools.lru_cache(maxsize=4)
def _class_colors(domain: str, num_images: int, size: tuple[int, int],
                  camera: Camera | None) -> np.ndarray:
    style = _style(domain, camera)
    sums = np.zeros((labels.NUM_CLASSES, 3))
    counts = np.zeros(labels.NUM_CLASSES)
    for index in range(num_images):
        rng = np.random.default_rng([12345, index])
        layout = sample_layout(rng, size)
        image = render(layout, style, rng).astype(np.float64)
        train_ids = labels.LABEL_ID_TO_TRAIN_ID[layout]
        for train_id in np.unique(train_ids):
            if train_id < labels.NUM_CLASSES:
                mask = train_ids == train_id
                sums[train_id] += image[mask].sum(axis=0)
                counts[train_id] += mask.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means.setflags(write=False)
    return means


def domain_class_colors(domain: str, num_images: int = 64, size: tuple[int, int] = DEFAULT_SIZE,
                        camera: Camera | None = None) -> np.ndarray:
    """Mean RGB [19, 3] (float, 0..255) of each trainId in ``domain``; NaN for classes not drawn.

    Measured over ``num_images`` rendered layouts (a fixed internal seed), so it includes
    textures and illumination; a translated source image should move toward the target's row.
    ``camera`` (target only) replaces the embedded camera.
    """
    _style(domain, camera)
    return _class_colors(domain, int(num_images), _check_size(size), camera).copy()


def sample_example(seed: int, domain: str, split: str, index: int,
                   size: tuple[int, int] = DEFAULT_SIZE,
                   camera: Camera | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (uint8 RGB image, uint8 labelId map) that ``generate_pair`` writes for one example.

    ``camera`` paints the target domain (``EMBEDDED_CAMERA`` when None); the source ignores it.
    """
    style = _style(domain, camera)
    domain_code = DOMAINS.index(domain)
    split_code = ("train", "val").index(split)
    rng = np.random.default_rng([int(seed), domain_code, split_code, int(index)])
    layout = sample_layout(rng, size)
    return render(layout, style, rng), layout


# ---------------------------------------------------------------------------------------------
# Files.

SOURCE_LAYOUTS = ("gta5", "synthia")
# SYNTHIA's terrain id: the labels.py table maps it to ignore, as every SYNTHIA benchmark subset
# leaves terrain out (liyunsheng13/BDL data/synthia_dataset.py maps 16 -> terrain).
SYNTHIA_TERRAIN_ID = 16


def _synthia_ids_of_label_ids() -> np.ndarray:
    """labelId -> SYNTHIA class id, the inverse of labels.SYNTHIA_ID_TO_TRAIN_ID through the
    trainIds; terrain gets SYNTHIA's terrain id and every other labelId 0 (void)."""
    table = np.zeros(256, np.uint16)
    for synthia_id, train_id in labels.SYNTHIA_ID_TO_TRAIN_ID.items():
        table[labels.TRAIN_ID_TO_LABEL_ID[train_id]] = synthia_id
    table[TERRAIN] = SYNTHIA_TERRAIN_ID
    return table


_LABEL_ID_TO_SYNTHIA_ID = _synthia_ids_of_label_ids()


def synthia_label(layout_label_ids: np.ndarray) -> np.ndarray:
    """The uint16 [H, W, 3] SYNTHIA-RAND-CITYSCAPES ``GT/LABELS`` array of a labelId layout.

    The class id is in the first channel (RGB order), as the dataset stores it
    (docs/facts.md); the second channel, the dataset's instance id, and the third stay 0.
    """
    label = np.zeros(layout_label_ids.shape + (3,), np.uint16)
    label[..., 0] = _LABEL_ID_TO_SYNTHIA_ID[layout_label_ids]
    return label


def _save_png(path: str, image: Image.Image) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG")


def _save_png16(path: str, array: np.ndarray) -> None:
    """Writes uint16 [H, W, 3] as a 16-bit RGB PNG (Pillow writes 16 bits only for greys)."""
    height, width, _ = array.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8),  # filter type 0 per row
                           array.astype(">u2").view(np.uint8).reshape(height, 6 * width)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16-bit RGB
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def _palette_png(layout: np.ndarray) -> Image.Image:
    image = Image.fromarray(layout, mode="P")
    image.putpalette(labels.LABEL_ID_PALETTE.reshape(-1).tolist())
    return image


def _write_source(root: str, layout_name: str, index: int, image: np.ndarray,
                  layout: np.ndarray) -> str:
    """Writes one source example in ``layout_name``; returns the image path relative to root.

    GTA5: ``images/00001.png`` and a palette ``labels/00001.png`` (index = labelId), names from
    1 (liyunsheng13/BDL data/gta5_dataset.py). SYNTHIA-RAND-CITYSCAPES: ``RGB/0000000.png`` and
    a 16-bit ``GT/LABELS/0000000.png``, names from 0 (docs/facts.md).
    """
    if layout_name == "gta5":
        name = f"{index + 1:05d}.png"
        _save_png(os.path.join(root, "images", name), Image.fromarray(image, mode="RGB"))
        _save_png(os.path.join(root, "labels", name), _palette_png(layout))
        return f"images/{name}"
    name = f"{index:07d}.png"
    _save_png(os.path.join(root, "RGB", name), Image.fromarray(image, mode="RGB"))
    _save_png16(os.path.join(root, "GT", "LABELS", name), synthia_label(layout))
    return f"RGB/{name}"


def generate_pair(out_dir: str, seed: int = 0, num_source: int = 200,
                  num_target_train: int = 100, num_target_val: int = 50,
                  size: tuple[int, int] = DEFAULT_SIZE, *, source_layout: str = "gta5",
                  source_size: tuple[int, int] | None = None,
                  camera: Camera | None = None) -> dict:
    """Writes the source and target (Cityscapes layout) sets under ``out_dir``.

    ``size`` is the (height, width) of the target images, ``source_size`` that of the source
    images (default ``size``); ``source_layout`` is "gta5" or "synthia" (SYNTHIA-RAND-CITYSCAPES,
    whose labels hold only the classes SYNTHIA has); ``camera`` paints the target
    (``EMBEDDED_CAMERA`` when None). Returns the manifest also written to
    ``out_dir/synthetic.json``: the parameters, the two roots and the relative paths of every
    image.
    """
    height, width = _check_size(size)
    source_hw = _check_size(size if source_size is None else source_size, "source_size")
    if source_layout not in SOURCE_LAYOUTS:
        raise ValueError(f"source_layout must be one of {SOURCE_LAYOUTS}, got {source_layout!r}")
    camera = EMBEDDED_CAMERA if camera is None else camera
    _style("target", camera)
    for name, count in (("num_source", num_source), ("num_target_train", num_target_train),
                        ("num_target_val", num_target_val)):
        if int(count) < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    source_root = os.path.join(out_dir, "source")
    target_root = os.path.join(out_dir, "target")
    for root in (source_root, target_root):
        if os.path.exists(root):
            raise ValueError(f"{root} already exists; generate_pair writes into a fresh out_dir "
                             "(delete it first) so no stale files mix with the new pair")
    progress = Progress("synthetic", num_source + num_target_train + num_target_val)
    done = 0
    source_files = []
    for index in range(num_source):
        image, layout = sample_example(seed, "source", "train", index, source_hw)
        source_files.append(_write_source(source_root, source_layout, index, image, layout))
        done += 1
        progress.update(done)
    target_files = {}
    for split, count, cities in (("train", num_target_train, TRAIN_CITIES),
                                 ("val", num_target_val, VAL_CITIES)):
        target_files[split] = []
        for index in range(count):
            image, layout = sample_example(seed, "target", split, index, (height, width),
                                           camera)
            city = cities[index % len(cities)]
            stem = f"{city}_{index:06d}_{_FRAME:06d}"
            image_rel = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            label_rel = f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"
            _save_png(os.path.join(target_root, image_rel), Image.fromarray(image, mode="RGB"))
            _save_png(os.path.join(target_root, label_rel), Image.fromarray(layout, mode="L"))
            target_files[split].append(image_rel)
            done += 1
            progress.update(done)
    manifest = {
        "appearance_version": APPEARANCE_VERSION, "seed": int(seed), "size": [height, width],
        "source_layout": source_layout, "source_size": list(source_hw),
        "camera": camera.to_json(), "num_source": int(num_source),
        "num_target_train": int(num_target_train), "num_target_val": int(num_target_val),
        "source_root": "source", "target_root": "target",
        "source_images": source_files, "target_images": target_files,
    }
    with open(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


@gin.configurable
def ensure_synthetic_pair(root: str, seed: int = 0, num_source: int = 200,
                          num_target_train: int = 100, num_target_val: int = 50,
                          size: tuple[int, int] = DEFAULT_SIZE, source_layout: str = "gta5",
                          source_size: tuple[int, int] | None = None,
                          camera_seed: int | None = None) -> tuple[str, str]:
    """Generates the pair into ``root`` unless it is there; returns (source_root, target_root).

    ``camera_seed`` paints the target through ``Camera.random(camera_seed)`` instead of the
    embedded camera (None). Generation goes to ``root + ".tmp"`` and is renamed when complete,
    so an interrupted run never leaves a ``root`` that looks complete. An existing ``root``
    made with other parameters, or by an older version of the appearance model
    (``APPEARANCE_VERSION``), is an error (delete it or choose another root).
    """
    if camera_seed is not None and (isinstance(camera_seed, bool)
                                    or not isinstance(camera_seed, (int, np.integer))):
        raise ValueError(f"camera_seed must be an int or None, got {camera_seed!r}")
    camera_seed = None if camera_seed is None else int(camera_seed)
    camera = EMBEDDED_CAMERA if camera_seed is None else Camera.random(camera_seed)
    target_hw = list(_check_size(size))
    wanted = {"appearance_version": APPEARANCE_VERSION, "seed": int(seed), "size": target_hw,
              "source_layout": source_layout,
              "source_size": list(_check_size(source_size, "source_size")) if source_size
              else target_hw,
              "camera_seed": camera_seed, "camera": camera.to_json(),
              "num_source": int(num_source), "num_target_train": int(num_target_train),
              "num_target_val": int(num_target_val)}
    source_root, target_root = os.path.join(root, "source"), os.path.join(root, "target")
    manifest_path = os.path.join(root, MANIFEST_NAME)
    if os.path.exists(root):
        if not os.path.isfile(manifest_path):
            raise ValueError(f"{root} exists but has no {MANIFEST_NAME}: it is not a synthetic "
                             "pair; delete it or pass another root to ensure_synthetic_pair")
        with open(manifest_path) as f:
            manifest = json.load(f)
        # Manifests written before the source layout, its size and the camera were parameters
        # describe the same files as these defaults.
        earlier = {"source_layout": "gta5", "source_size": manifest.get("size"),
                   "camera_seed": None, "camera": EMBEDDED_CAMERA.to_json()}
        found = {key: manifest.get(key, earlier.get(key)) for key in wanted}
        if found != wanted:
            differing = {key: (found[key], wanted[key]) for key in wanted
                         if found[key] != wanted[key]}
            raise ValueError(f"{manifest_path} was generated with other parameters "
                             f"(found, asked for): {differing}; delete it or pass another root")
        return source_root, target_root
    staging = root.rstrip(os.sep) + ".tmp"
    if os.path.exists(staging):
        shutil.rmtree(staging)  # left by an interrupted run
    manifest = generate_pair(staging, seed=seed, num_source=num_source,
                             num_target_train=num_target_train, num_target_val=num_target_val,
                             size=size, source_layout=source_layout, source_size=source_size,
                             camera=camera)
    manifest["camera_seed"] = camera_seed
    with open(os.path.join(staging, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(staging, root)
    return source_root, target_root


def save_preview(out_png: str, seed: int = 0, num_examples: int = 4,
                 size: tuple[int, int] = DEFAULT_SIZE, zoom: int = 2,
                 camera: Camera | None = None) -> None:
    """Saves a grid PNG: one row per example, columns source image, source labels, target
    image (through ``camera``, the embedded one when None), target labels (Cityscapes colours,
    void black), each enlarged ``zoom`` times."""
    height, width = _check_size(size)
    gap = 2
    rows = []
    for index in range(num_examples):
        cells = []
        for domain in DOMAINS:
            image, layout = sample_example(seed, domain, "train", index, (height, width),
                                           camera)
            train_ids = labels.LABEL_ID_TO_TRAIN_ID[layout]
            colours = np.zeros((256, 3), np.uint8)
            colours[:labels.NUM_CLASSES] = labels.PALETTE
            cells += [image, colours[train_ids]]
        spacer = np.full((height, gap, 3), 255, np.uint8)
        rows.append(np.concatenate([c for cell in cells for c in (cell, spacer)][:-1], axis=1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0).repeat(zoom, axis=0).repeat(zoom, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    Image.fromarray(grid, mode="RGB").save(out_png, format="PNG")


def main(argv: list[str]) -> None:
    from absl import flags, logging

    del argv
    values = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    camera = None if values.camera_seed is None else Camera.random(values.camera_seed)
    source_size = None
    if values.source_height is not None or values.source_width is not None:
        source_size = (values.source_height or values.height, values.source_width or values.width)
    manifest = generate_pair(values.out, seed=values.seed, num_source=values.num_source,
                             num_target_train=values.num_target_train,
                             num_target_val=values.num_target_val,
                             size=(values.height, values.width),
                             source_layout=values.source_layout, source_size=source_size,
                             camera=camera)
    if values.preview:
        save_preview(values.preview, seed=values.seed, size=(values.height, values.width),
                     camera=camera)
    logging.info("wrote %d source and %d + %d target examples under %s",
                 manifest["num_source"], manifest["num_target_train"],
                 manifest["num_target_val"], values.out)


def _define_flags() -> None:
    """Flags live here, not at import time, so importing this module defines no global flags."""
    from absl import flags

    flags.DEFINE_string("out", None, "Output directory (gets source/, target/, synthetic.json).")
    flags.DEFINE_integer("seed", 0, "Seed; the same seed gives byte-identical files.")
    flags.DEFINE_integer("num_source", 200, "Source examples.")
    flags.DEFINE_enum("source_layout", "gta5", list(SOURCE_LAYOUTS),
                      "Source layout: GTA5 or SYNTHIA-RAND-CITYSCAPES.")
    flags.DEFINE_integer("num_target_train", 100, "Target (Cityscapes-layout) train examples.")
    flags.DEFINE_integer("num_target_val", 50, "Target val examples.")
    flags.DEFINE_integer("height", DEFAULT_SIZE[0], "Target image height in pixels.")
    flags.DEFINE_integer("width", DEFAULT_SIZE[1], "Target image width in pixels.")
    flags.DEFINE_integer("source_height", None, "Source image height (default --height).")
    flags.DEFINE_integer("source_width", None, "Source image width (default --width).")
    flags.DEFINE_integer("camera_seed", None,
                         "Paint the target through Camera.random(SEED) instead of the embedded "
                         "camera.")
    flags.DEFINE_string("preview", None, "Optional PNG path for a preview grid.")
    flags.mark_flag_as_required("out")


def run() -> None:
    """``python -m sait_tf.data.synthetic``."""
    from sait_tf import cli

    cli.run(main, _define_flags)


if __name__ == "__main__":
    run()
