"""Procedural toy identities: person-like (ReID) and face-like images, deterministic by seed.

The toy data is the library's embedded default for the demo, the tests and the notebooks. An identity is a
fixed set of attributes drawn from small palettes (so single attributes collide between identities and no
single cue suffices); every image of it varies pose, scale, background, lighting, occlusion and noise, so
raw-pixel matching does poorly while a small CNN learns the identities.

Every image has its own random stream, seeded by ``(seed, purpose, identity, image index)``, so a dataset is
byte-identical across runs. Datasets are written to a temporary sibling folder and renamed to ``root`` at
the end: an interrupted run leaves nothing behind, and concurrent callers (DDP ranks) are safe.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from rgsd_lightning.io import atomic_folder

FORMAT_VERSION = 1
_ID_P, _CAM, _PLAN, _IMG_P, _ID_F, _IMG_F, _DISTRACT = range(1, 8)  # random-stream purposes

Color = tuple[int, int, int]


def _palette(spec: str) -> tuple[Color, ...]:
    return tuple((int(h[:2], 16), int(h[2:4], 16), int(h[4:], 16)) for h in spec.split())


# small palettes on purpose: single attributes collide between identities
SHIRTS = _palette("c82828 2846be 28963c e6c832 e6e6e6 232323 783296 e6781e 828282 1e9696")
TROUSERS = _palette("1e285a 191919 6e6e6e beaa82 6e4628 4664a0")
SHOES = _palette("141414 ebebeb 643c1e b41e1e")
SKINS = _palette("fadcbe e6be96 c8966e 966446 64412d")
HAIRS = _palette("141414 6e3c19 ebcd78 c8c8c8 be4619")
BAGS = _palette("141414 6e4628 be2828 2846be")
EYES = _palette("3c2814 3264aa 3c8246 1e1e1e")
PATTERNS = ("plain", "hstripes", "vstripes", "two-tone", "checks")
HAIR_STYLES = ("short", "long", "fringe", "bun", "side", "afro", "bald")  # bald is drawn half as often


@dataclass(frozen=True)
class PersonIdentity:
    """The fixed look of one toy person; fractions are relative to the image size."""

    seed: int  # dataset seed: fixes the per-camera colour casts
    shirt: Color
    shirt2: Color  # second colour of the shirt pattern
    pattern: str
    trousers: Color
    shoes: Color
    skin: Color
    hair: Color
    width: float  # torso width / image width
    height: float  # body height / 0.9 image height
    bag: str | None  # "left", "right" or None
    bag_color: Color


@dataclass(frozen=True)
class FaceIdentity:
    """The fixed look of one toy face; lengths are in face units (1/56 of the image side at scale 1)."""

    oval: float  # half-width of the face
    skin: Color
    hair: Color
    hair_style: str
    eye_color: Color
    eye_spacing: float
    brow: float  # brow thickness
    mouth: float  # mouth half-width
    glasses: bool
    beard: bool


def _pick(rng: np.random.Generator, palette: tuple[Any, ...]) -> Any:
    return palette[int(rng.integers(len(palette)))]


def person_identity(seed: int, pid: int) -> PersonIdentity:
    """Deterministic attributes of toy person ``pid`` in the dataset of ``seed``."""
    rng = np.random.default_rng([seed, _ID_P, pid])
    i, j = rng.choice(len(SHIRTS), size=2, replace=False)
    bag = _pick(rng, ("left", "right", None, None, None))
    return PersonIdentity(
        seed=seed,
        shirt=SHIRTS[i],
        shirt2=SHIRTS[j],
        pattern=_pick(rng, PATTERNS),
        trousers=_pick(rng, TROUSERS),
        shoes=_pick(rng, SHOES),
        skin=_pick(rng, SKINS),
        hair=_pick(rng, HAIRS),
        width=float(rng.uniform(0.34, 0.5)),
        height=float(rng.uniform(0.85, 1.0)),
        bag=bag,
        bag_color=_pick(rng, BAGS),
    )


def face_identity(seed: int, index: int) -> FaceIdentity:
    """Deterministic attributes of toy face ``index`` in the dataset of ``seed``."""
    rng = np.random.default_rng([seed, _ID_F, index])
    return FaceIdentity(
        oval=float(rng.uniform(13.0, 17.0)),
        skin=_pick(rng, SKINS),
        hair=_pick(rng, HAIRS),
        hair_style=_pick(rng, HAIR_STYLES[:-1] * 2 + HAIR_STYLES[-1:]),
        eye_color=_pick(rng, EYES),
        eye_spacing=float(rng.uniform(5.0, 7.5)),
        brow=float(rng.uniform(0.8, 2.6)),
        mouth=float(rng.uniform(3.5, 7.0)),
        glasses=bool(rng.random() < 0.3),
        beard=bool(rng.random() < 0.25),
    )


def camera_cast(seed: int, camera: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel gain and offset of camera ``camera`` (0-based) in the dataset of ``seed``."""
    rng = np.random.default_rng([seed, _CAM, camera])
    return 1.0 + rng.uniform(-0.18, 0.18, 3), rng.uniform(-15.0, 15.0, 3)


def _rand_color(rng: np.random.Generator) -> Color:
    return tuple(int(c) for c in rng.integers(20, 236, 3))


def _finish(
    img: Image.Image, rng: np.random.Generator, size: tuple[int, int], gain: Any = 1.0, offset: Any = 0.0
) -> np.ndarray:
    """Downsample (anti-aliasing), then lighting, colour cast and pixel noise -> HxWx3 uint8."""
    a = np.asarray(img.resize(size, Image.Resampling.BOX), dtype=np.float64)
    mean = a.mean()
    a = ((a - mean) * rng.uniform(0.85, 1.15) + mean) * rng.uniform(0.85, 1.15)
    a = a * gain + offset + rng.normal(0.0, 4.0, a.shape)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, w: int, h: int, clutter: int) -> Image.Image:
    top, bottom = np.array(_rand_color(rng)), np.array(_rand_color(rng))
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(clutter):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        dx, dy = rng.uniform(0.05, 0.3) * w, rng.uniform(0.03, 0.2) * h
        shape = draw.rectangle if rng.random() < 0.6 else draw.ellipse
        shape((x - dx, y - dy, x + dx, y + dy), fill=_rand_color(rng))
    return img


def _shirt_fill(p: PersonIdentity, w: int, h: int, box: tuple[float, float, float, float]) -> Image.Image:
    """The shirt colour and pattern over the whole canvas, aligned to the torso ``box``."""
    img = Image.new("RGB", (w, h), p.shirt)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if p.pattern == "two-tone":
        draw.rectangle((0, (y0 + y1) / 2, w, h), fill=p.shirt2)
    elif p.pattern != "plain":
        step = (y1 - y0) / 6 if p.pattern == "hstripes" else (x1 - x0) / 4
        for k in range(-8, 16):
            a = (y0 if p.pattern == "hstripes" else x0) + k * step
            if p.pattern == "hstripes":
                draw.rectangle((0, a, w, a + step / 2), fill=p.shirt2)
            elif p.pattern == "vstripes":
                draw.rectangle((a, 0, a + step / 2, h), fill=p.shirt2)
            else:  # checks
                for m in range(-8, 16):
                    if (k + m) % 2:
                        yb = y0 + m * step
                        draw.rectangle((a, yb, a + step, yb + step), fill=p.shirt2)
    return img


def _trapezoid(
    draw: ImageDraw.ImageDraw, top: tuple[float, ...], bottom: tuple[float, ...], fill: Any
) -> None:
    """Fill the quadrilateral between two horizontal edges, each given as (centre x, half-width, y)."""
    (xt, wt, yt), (xb, wb, yb) = top, bottom
    draw.polygon([(xt - wt, yt), (xt + wt, yt), (xb + wb, yb), (xb - wb, yb)], fill=fill)


def render_person(
    identity: PersonIdentity, rng: np.random.Generator, camera: int, height: int, width: int
) -> np.ndarray:
    """One image (``height`` x ``width`` x 3, uint8) of a toy person seen by ``camera`` (0-based)."""
    ss = 2  # draw at twice the size, then box-downsample
    w, h = width * ss, height * ss
    img = _background(rng, w, h, int(rng.integers(2, 6)))
    draw = ImageDraw.Draw(img)
    scale = rng.uniform(0.8, 1.0)
    ph, tw = 0.9 * h * identity.height * scale, w * identity.width * scale
    top = (h - ph) / 2 + rng.uniform(-0.04, 0.04) * h
    cx, lean, phase = w * (0.5 + rng.uniform(-0.13, 0.13)), rng.uniform(-0.05, 0.05) * ph, rng.uniform(-1, 1)

    def y(f: float) -> float:
        return top + f * ph

    def x(f: float) -> float:  # body centre at height fraction f (leaning from the feet)
        return cx + lean * (1.0 - f)

    lw = 0.42 * tw
    for side in (-1, 1):  # legs and shoes
        hip, foot = x(0.52) + side * (tw / 2 - lw / 2), x(0.95) + side * tw * (0.22 - 0.25 * phase * side)
        _trapezoid(draw, (hip, lw / 2, y(0.52)), (foot, lw / 2.4, y(0.96)), identity.trousers)
        draw.ellipse((foot - lw * 0.65, y(0.94), foot + lw * 0.65, y(1.0)), fill=identity.shoes)
    mask = Image.new("L", (w, h), 0)
    mdraw = ImageDraw.Draw(mask)
    _trapezoid(mdraw, (x(0.16), tw / 2, y(0.16)), (x(0.54), tw / 2, y(0.54)), 255)  # torso
    aw = 0.2 * tw
    for side in (-1, 1):  # sleeves swing against the legs
        sh, hand = x(0.17) + side * (tw / 2 + aw / 2), x(0.5) + side * (tw / 2 + aw / 2) + phase * side * aw
        _trapezoid(mdraw, (sh, aw / 2, y(0.17)), (hand, aw / 2, y(0.47)), 255)
        draw.ellipse((hand - aw / 2, y(0.46), hand + aw / 2, y(0.52)), fill=identity.skin)
    img.paste(_shirt_fill(identity, w, h, (x(0.35) - tw / 2, y(0.16), x(0.35) + tw / 2, y(0.54))), mask=mask)
    draw.rectangle((x(0.13) - tw * 0.1, y(0.12), x(0.13) + tw * 0.1, y(0.17)), fill=identity.skin)  # neck
    hx, rx, ry = x(0.07), tw * 0.3, 0.075 * ph
    draw.ellipse((hx - rx, y(0.075) - ry, hx + rx, y(0.075) + ry), fill=identity.skin)
    draw.chord(
        (hx - rx * 1.1, y(0.075) - ry * 1.15, hx + rx * 1.1, y(0.075) + ry * 0.9),
        180,
        360,
        fill=identity.hair,
    )
    if identity.bag is not None:
        side = -1 if identity.bag == "left" else 1
        bx = x(0.45) + side * (tw / 2 + aw * 0.9)
        draw.line((x(0.17) - side * tw * 0.35, y(0.17), bx, y(0.4)), fill=identity.bag_color, width=ss)
        draw.rectangle((bx - tw * 0.22, y(0.38), bx + tw * 0.22, y(0.56)), fill=identity.bag_color)
    if rng.random() < 0.25:  # occluder: another object in front of the person
        ow, oh = rng.uniform(0.3, 0.8) * w, rng.uniform(0.15, 0.35) * h
        ox, oy = rng.uniform(0, w - ow), (h - oh if rng.random() < 0.5 else rng.uniform(0, h - oh))
        draw.rectangle((ox, oy, ox + ow, oy + oh), fill=_rand_color(rng))
    gain, offset = camera_cast(identity.seed, camera)
    return _finish(img, rng, (width, height), gain, offset)


def render_face(identity: FaceIdentity, rng: np.random.Generator, size: int) -> np.ndarray:
    """One image (``size`` x ``size`` x 3, uint8) of a toy face."""
    s = 2 * size
    bg = _background(rng, s, s, int(rng.integers(0, 4)))
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    k = s / 56 * rng.uniform(0.88, 1.08)  # scale; coordinates below are in face units around the centre
    c = s / 2

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (c + x0 * k, c + y0 * k, c + x1 * k, c + y1 * k)

    f, idt = identity.oval, identity
    draw.rectangle(box(-26, 22, 26, 40), fill=_rand_color(rng))  # shoulders: random clothes
    if idt.hair_style == "afro":
        draw.ellipse(box(-f - 7, -29, f + 7, 8), fill=idt.hair)
    elif idt.hair_style == "long":
        draw.rounded_rectangle(box(-f - 4, -22, f + 4, 26), radius=(f + 2) * k, fill=idt.hair)
    draw.rectangle(box(-5, 10, 5, 24), fill=idt.skin)  # neck
    draw.ellipse(box(-f, -19, f, 19), fill=idt.skin)
    if idt.beard:
        draw.chord(box(-f, -19, f, 19), 25, 155, fill=idt.hair)
    if idt.hair_style != "bald":
        draw.chord(box(-f - 1.5, -21, f + 1.5, 4), 180, 360, fill=idt.hair)
    else:
        draw.chord(box(-f - 1, -12, f + 1, 8), 160, 200, fill=idt.hair)
    if idt.hair_style == "fringe":
        draw.rectangle(box(-f * 0.8, -13, f * 0.8, -7), fill=idt.hair)
    elif idt.hair_style == "side":  # swept fringe
        draw.polygon(
            [(c - f * k, c - 16 * k), (c + f * 0.7 * k, c - 17 * k), (c - f * 0.5 * k, c - 7 * k)],
            fill=idt.hair,
        )
    elif idt.hair_style == "bun":
        draw.ellipse(box(-6, -28, 6, -17), fill=idt.hair)
    closed = rng.random() < 0.15
    for side in (-1, 1):
        ex = side * idt.eye_spacing
        if closed:
            draw.line(box(ex - 3, -2, ex + 3, -2), fill=(40, 30, 30), width=max(1, round(k)))
        else:
            draw.ellipse(box(ex - 3.2, -4, ex + 3.2, 0), fill=(245, 245, 245))
            draw.ellipse(box(ex - 1.7, -3.7, ex + 1.7, -0.3), fill=idt.eye_color)
        draw.line(
            box(ex - 3.5, -7, ex + 3.5, -7.5 + side * 0.5), fill=idt.hair, width=max(1, round(idt.brow * k))
        )
        if idt.glasses:
            draw.ellipse(box(ex - 4.5, -6.5, ex + 4.5, 2.5), outline=(20, 20, 20), width=max(1, round(k)))
    if idt.glasses:
        draw.line(
            box(-idt.eye_spacing + 4.5, -2, idt.eye_spacing - 4.5, -2),
            fill=(20, 20, 20),
            width=max(1, round(k)),
        )
    draw.line(box(0, -1, -1, 5), fill=tuple(int(0.75 * v) for v in idt.skin), width=max(1, round(k)))  # nose
    curve, m = rng.uniform(-1.5, 3.0), idt.mouth
    pts = [(c + u * m * k, c + (10 + curve * (1 - u * u)) * k) for u in np.linspace(-1, 1, 9)]
    draw.line(pts, fill=(150, 40, 50), width=max(1, round(1.6 * k)))
    angle, (dx, dy) = rng.uniform(-8, 8), rng.uniform(-0.12, 0.12, 2) * s
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, center=(c, c), translate=(dx, dy))
    bg.paste(layer, mask=layer.getchannel("A"))
    theta, amp = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.25)  # directional light
    g = np.linspace(-1, 1, s)
    light = 1 + amp * (np.cos(theta) * g[None, :] + np.sin(theta) * g[:, None])
    lit = np.clip(np.asarray(bg, dtype=np.float64) * light[..., None], 0, 255).astype(np.uint8)
    return _finish(Image.fromarray(lit), rng, (size, size))


def _check_ints(params: dict[str, Any], limits: dict[str, tuple[int, float]]) -> None:
    for name, (low, high) in limits.items():
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            bound = f">= {low}" if high == math.inf else f"in [{low}, {int(high)}]"
            raise ValueError(f"toy data: {name} must be an integer {bound}, got {value!r}")


_INF = math.inf
_MARKET_LIMITS = {
    "num_train_ids": (1, _INF),
    "num_test_ids": (1, _INF),
    "images_per_id": (4, _INF),
    "num_cameras": (2, 9),
    "num_distractors": (0, _INF),
    "height": (16, _INF),
    "width": (8, _INF),
    "seed": (0, _INF),
}
_FACE_LIMITS = {"num_ids": (1, 9999), "images_per_id": (1, _INF), "size": (16, _INF), "seed": (0, _INF)}


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")


def _existing_is_same(root: Path, meta: dict[str, Any], overwrite: bool) -> bool:
    """True when ``root`` already holds this dataset; raises when it holds something else."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return False
    info = root / "toy.json"
    if not info.is_file():
        raise FileExistsError(f"{root} exists and is not a toy dataset (no toy.json); refusing to replace it")
    try:
        old = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{info} is not valid JSON ({err}); remove {root} or pass another root") from err
    old_flat = {"format_version": old.get("format_version"), "kind": old.get("kind"), **old.get("params", {})}
    new_flat = {"format_version": meta["format_version"], "kind": meta["kind"], **meta["params"]}
    diff = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    if diff and not overwrite:
        changes = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in diff)
        raise ValueError(f"{root} holds a toy dataset with other parameters ({changes}); pass overwrite=True")
    return not diff and not overwrite


def _build(
    root: str | os.PathLike, kind: str, params: dict[str, Any], overwrite: bool, writer: Callable[..., None]
) -> Path:
    """Write a dataset with ``writer`` into a temporary sibling folder, then rename it to ``root``."""
    root = Path(root).absolute()
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "params": params}
    if _existing_is_same(root, meta, overwrite):
        return root
    try:
        with atomic_folder(root, replace=overwrite) as tmp:
            writer(tmp, **params)
            (tmp / "toy.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except FileExistsError:  # a concurrent caller published first: keep theirs if it is the same dataset
        if not (root / "toy.json").is_file():
            raise
        _existing_is_same(root, meta, False)
    return root


def _write_market(
    out: Path,
    *,
    num_train_ids: int,
    num_test_ids: int,
    images_per_id: int,
    num_cameras: int,
    num_distractors: int,
    height: int,
    width: int,
    seed: int,
) -> None:
    folders = {n: out / n for n in ("bounding_box_train", "bounding_box_test", "query")}
    for folder in folders.values():
        folder.mkdir()
    frames = [0] * num_cameras

    def write(folder: str, name_pid: int, pid: int, k: int, camera: int) -> None:
        image = render_person(
            person_identity(seed, pid), np.random.default_rng([seed, _IMG_P, pid, k]), camera, height, width
        )
        frames[camera] += 1
        _save(image, folders[folder] / f"{name_pid:04d}_c{camera + 1}s1_{frames[camera]:06d}_01.png")

    for pid in range(1, num_train_ids + num_test_ids + 1):
        plan = np.random.default_rng([seed, _PLAN, pid])
        n_cams = int(plan.integers(2, min(num_cameras, images_per_id // 2) + 1))
        cams = plan.choice(num_cameras, size=n_cams, replace=False)
        # every camera used gets >= 2 images, so after one query per camera each keeps a gallery image
        assign = np.concatenate([np.repeat(cams, 2), plan.choice(cams, size=images_per_id - 2 * n_cams)])
        plan.shuffle(assign)
        seen: set[int] = set()
        for k, camera in enumerate(int(c) for c in assign):
            if pid <= num_train_ids:
                folder = "bounding_box_train"
            else:
                folder = "bounding_box_test" if camera in seen else "query"
                seen.add(camera)
            write(folder, pid, pid, k, camera)
    first = num_train_ids + num_test_ids + 1  # distractors: people who are neither train nor test ids
    for i in range(num_distractors):
        camera = int(np.random.default_rng([seed, _DISTRACT, i]).integers(num_cameras))
        write("bounding_box_test", 0, first + i, 0, camera)


def make_toy_market(
    root: str | os.PathLike,
    *,
    num_train_ids: int = 16,
    num_test_ids: int = 16,
    images_per_id: int = 8,
    num_cameras: int = 4,
    num_distractors: int = 20,
    height: int = 64,
    width: int = 32,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a toy person-ReID dataset in the Market-1501 layout and return its folder.

    Args:
        root: dataset folder (``bounding_box_train/``, ``bounding_box_test/``, ``query/``, ``toy.json``).
        num_train_ids: training identities (pids 0001...).
        num_test_ids: test identities (the pids after the training ones), split into query and gallery.
        images_per_id: images per identity (>= 4: each identity spans >= 2 cameras with >= 2 images each).
        num_cameras: cameras (2..9), each with a fixed colour cast.
        num_distractors: gallery images with pid 0000 showing people who are not test identities.
        height: image height in pixels.
        width: image width in pixels.
        seed: dataset seed; the same arguments give byte-identical files.
        overwrite: replace an existing toy dataset made with other arguments instead of raising.

    Raises:
        ValueError: a bad argument, or ``root`` holds a toy dataset with other arguments (keys named).
        FileExistsError: ``root`` is a non-empty folder that is not a toy dataset.
    """
    params = dict(
        num_train_ids=num_train_ids,
        num_test_ids=num_test_ids,
        images_per_id=images_per_id,
        num_cameras=num_cameras,
        num_distractors=num_distractors,
        height=height,
        width=width,
        seed=seed,
    )
    _check_ints(params, _MARKET_LIMITS)
    if num_train_ids + num_test_ids > 9999:
        raise ValueError(
            f"toy data: num_train_ids + num_test_ids must be <= 9999 (4-digit pids), got "
            f"{num_train_ids + num_test_ids}"
        )
    return _build(root, "market1501", params, overwrite, _write_market)


def _write_faces(out: Path, *, num_ids: int, images_per_id: int, size: int, seed: int) -> None:
    for index in range(1, num_ids + 1):
        folder = out / f"id{index:04d}"
        folder.mkdir()
        identity = face_identity(seed, index)
        for n in range(1, images_per_id + 1):
            _save(
                render_face(identity, np.random.default_rng([seed, _IMG_F, index, n]), size),
                folder / f"{n}.png",
            )


def make_toy_faces(
    root: str | os.PathLike,
    *,
    num_ids: int = 20,
    images_per_id: int = 10,
    size: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a toy face dataset in the identity-folder layout (``root/id0001/1.png``) and return its folder.

    Args:
        root: dataset folder (one sub-folder per identity, plus ``toy.json``).
        num_ids: identities (``id0001``...).
        images_per_id: images per identity, named ``1.png`` ... ``<images_per_id>.png``.
        size: image side in pixels (square images).
        seed: dataset seed; the same arguments give byte-identical files.
        overwrite: replace an existing toy dataset made with other arguments instead of raising.

    Raises:
        ValueError: a bad argument, or ``root`` holds a toy dataset with other arguments (keys named).
        FileExistsError: ``root`` is a non-empty folder that is not a toy dataset.
    """
    params = dict(num_ids=num_ids, images_per_id=images_per_id, size=size, seed=seed)
    _check_ints(params, _FACE_LIMITS)
    return _build(root, "faces", params, overwrite, _write_faces)


def write_toy_synthetic_set(
    folder: str | os.PathLike,
    pids: Collection[int],
    per_id: int,
    *,
    wrong_label: dict[int, int] | None = None,
    seed: int = 777,
    dataset_seed: int = 0,
    height: int = 64,
    width: int = 32,
) -> Path:
    """A stand-in for a generator's output: new views of toy_market persons as a synthetic set.

    Writes ``images/<label>/<pid>_<n>.png`` (the file name keeps the true identity) and ``manifest.jsonl``
    (source "synthetic"). Person ``pid`` of the toy market with ``dataset_seed`` is drawn ``per_id`` times
    from the random stream ``seed`` (other views than the dataset's own images), on cameras 0-3 in turn.
    ``wrong_label`` maps a pid to the identity its images are labelled with: a generator that draws one
    person under another's label, with known ground truth. Returns the folder.
    """
    from rgsd_lightning.data.records import IdentityRecord, write_manifest

    folder = Path(folder)
    records = []
    for pid in pids:
        look = person_identity(dataset_seed, pid)
        label = f"{(wrong_label or {}).get(pid, pid):04d}"
        for n in range(per_id):
            image = render_person(look, np.random.default_rng([seed, pid, n]), n % 4, height, width)
            path = folder / "images" / label / f"{pid:04d}_{n}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(path)
            records.append(IdentityRecord(str(path), label, n % 4, "synthetic", "train"))
    write_manifest(folder / "manifest.jsonl", records)
    return folder
