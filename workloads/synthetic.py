"""The built-in synthetic suite: six MMSpec topics drawn with Pillow, no data download needed.

Each sample comes from a small structured picture (shapes, a sign, an outdoor scene, a chart, a
diagram) plus questions about it, so the reference answer is known exactly from the picture.
Everything is drawn from a per-sample random generator seeded by (seed, topic, index): the same
arguments give the same PNG bytes on every call, and a larger `per_topic` only appends samples.
"""

from __future__ import annotations

import functools
import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageDraw, ImageFont

from .errors import WorkloadError
from .sample import TOPICS, Sample

SIZE = 224  # small enough to keep the suite cheap, the size many vision towers expect
CATEGORY = "synthetic"

RGB = tuple[int, int, int]
COLOURS: dict[str, RGB] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "yellow": (240, 200, 20),
    "orange": (245, 127, 14),
    "purple": (148, 80, 189),
}
BLACK: RGB = (0, 0, 0)
WHITE: RGB = (255, 255, 255)
SKY: RGB = (170, 210, 240)
GRASS: RGB = (110, 180, 80)
SHAPE_KINDS = ("circle", "square", "triangle", "diamond")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


class Picture(Protocol):
    """A structured picture: its fields are the ground truth the questions are asked about."""

    def draw(self) -> Image.Image: ...


@dataclass(frozen=True)
class Scene:
    """One synthetic prompt: a picture, the user turns about it and one reference per turn."""

    topic: str
    picture: Picture
    turns: tuple[str, ...]
    references: tuple[str, ...]


@dataclass(frozen=True)
class SyntheticItem:
    """A sample together with the scene it was drawn from (for reference answers)."""

    sample: Sample
    scene: Scene


# --- drawing helpers -------------------------------------------------------------------------


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        # Pillow without FreeType (or < 10.1) has only the fixed-size bitmap font.
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, size: int) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=_font(size))
    return int(right - left), int(bottom - top)


def _text(
    draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, size: int, fill: RGB
) -> None:
    """Draw text centred on a point (anchors are not supported by the bitmap fallback font)."""
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = round(centre[0] - (left + right) / 2)
    y = round(centre[1] - (top + bottom) / 2)
    draw.text((x, y), text, font=font, fill=fill)


def _fit_size(draw: ImageDraw.ImageDraw, lines: tuple[str, ...], width: int, start: int) -> int:
    size = start
    while size > 8 and max(_text_size(draw, line, size)[0] for line in lines) > width:
        size -= 1
    return size


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No metadata and a fixed compression level keep the bytes identical across calls.
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- general vqa: coloured shapes on a 3x3 grid -------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPE_KINDS
    colour: str  # key of COLOURS
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    @property
    def position(self) -> str:
        if (self.row, self.col) == (1, 1):
            return "center"
        return f"{ROWS[self.row]} {COLS[self.col]}"


@dataclass(frozen=True)
class ShapesPicture:
    shapes: tuple[Shape, ...]

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        cell = SIZE / 3
        r = 22
        for s in self.shapes:
            cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=2)
            elif s.kind == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=2)
            elif s.kind == "triangle":
                points = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
                draw.polygon(points, fill=fill, outline=BLACK, width=2)
            else:  # diamond
                points = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
                draw.polygon(points, fill=fill, outline=BLACK, width=2)
        return image

    def reading_order(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: (s.row, s.col))

    def describe(self) -> str:
        parts = [
            f"{_article(s.colour)} {s.colour} {s.kind} at the {s.position}"
            for s in self.reading_order()
        ]
        return f"There are {len(self.shapes)} shapes: {_join(parts)}."


def _random_shapes(rng: random.Random) -> ShapesPicture:
    n = rng.randint(2, 5)
    cells = rng.sample(range(9), n)
    pairs = rng.sample([(k, c) for k in SHAPE_KINDS for c in COLOURS], n)
    shapes = tuple(
        Shape(kind=k, colour=c, row=cell // 3, col=cell % 3)
        for (k, c), cell in zip(pairs, cells, strict=True)
    )
    return ShapesPicture(shapes)


def _general_vqa(rng: random.Random) -> Scene:
    picture = _random_shapes(rng)
    shapes = picture.shapes
    target = rng.choice(shapes)
    unique_kinds = [s for s in shapes if sum(o.kind == s.kind for o in shapes) == 1]
    kind = rng.choice(("colour", "shape_at", "count", "where", "count_colour"))
    if kind == "colour" and unique_kinds:
        target = rng.choice(unique_kinds)
        question, answer = f"What colour is the {target.kind}?", target.colour
    elif kind == "shape_at":
        question, answer = f"What shape is at the {target.position} of the image?", target.kind
    elif kind == "where":
        question = f"Where is the {target.colour} {target.kind} in the image?"
        answer = target.position
    elif kind == "count_colour":
        colour = rng.choice(sorted({s.colour for s in shapes}))
        question = f"How many {colour} shapes are there in the image?"
        answer = str(sum(s.colour == colour for s in shapes))
    else:
        question, answer = "How many shapes are there in the image?", str(len(shapes))
    return Scene(TOPICS[0], picture, (question,), (answer,))


# --- text vqa: a sign with a word or number ----------------------------------------------------


SIGN_COLOURS: dict[str, tuple[RGB, RGB]] = {  # board, text
    "red": (COLOURS["red"], WHITE),
    "green": ((20, 110, 50), WHITE),
    "blue": (COLOURS["blue"], WHITE),
    "yellow": (COLOURS["yellow"], BLACK),
    "white": (WHITE, BLACK),
}
SIGN_WORDS = ("STOP", "OPEN", "EXIT", "BAKERY", "HOTEL", "PARKING", "MUSEUM", "LIBRARY", "CAFE")


@dataclass(frozen=True)
class SignPicture:
    lines: tuple[str, ...]  # text on the board, top to bottom
    colour: str  # key of SIGN_COLOURS

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), SKY)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 170, SIZE, SIZE), fill=GRASS)
        draw.rectangle((106, 120, 118, 200), fill=(120, 120, 120))  # post
        board, ink = SIGN_COLOURS[self.colour]
        box = (22, 30, 202, 130)
        draw.rectangle(box, fill=board, outline=BLACK, width=3)
        size = _fit_size(draw, self.lines, box[2] - box[0] - 20, 40)
        height = (box[3] - box[1]) / len(self.lines)
        for i, line in enumerate(self.lines):
            _text(draw, (SIZE / 2, box[1] + height * (i + 0.5)), line, size, ink)
        return image


def _text_vqa(rng: random.Random) -> Scene:
    colour = rng.choice(sorted(SIGN_COLOURS))
    kind = rng.choice(("word", "speed", "price", "platform"))
    if kind == "word":
        word = rng.choice(SIGN_WORDS)
        lines, question, answer = (word,), "What word is written on the sign?", word
    elif kind == "speed":
        limit = str(rng.choice(range(20, 130, 10)))
        lines = ("SPEED LIMIT", limit)
        question, answer = "What speed limit is shown on the sign?", limit
    elif kind == "price":
        price = f"${rng.randint(1, 19)}.{rng.choice(range(0, 100, 5)):02d}"
        lines, question, answer = ("SALE", price), "What price is shown on the sign?", price
    else:
        number = str(rng.randint(1, 24))
        lines = ("PLATFORM", number)
        question, answer = "Which platform number is written on the sign?", number
    return Scene(TOPICS[1], SignPicture(lines, colour), (question,), (answer,))


# --- image captioning: an outdoor scene --------------------------------------------------------


SLOTS = ("left", "middle", "right")
SLOT_X = (40, 112, 184)
GROUND_COLOURS = {
    "house": ("red", "blue", "yellow", "orange"),
    "tree": ("green",),
    "car": ("red", "blue", "yellow", "purple"),
    "flower": ("red", "yellow", "purple", "orange"),
}


@dataclass(frozen=True)
class GroundObject:
    kind: str  # key of GROUND_COLOURS
    colour: str  # key of COLOURS
    slot: int  # index into SLOTS


@dataclass(frozen=True)
class OutdoorPicture:
    sun: str | None  # "left" / "right" corner of the sky, or no sun
    clouds: int  # 0..2
    objects: tuple[GroundObject, ...]

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), SKY)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 150, SIZE, SIZE), fill=GRASS)
        if self.sun is not None:
            x = 34 if self.sun == "left" else SIZE - 34
            draw.ellipse((x - 18, 16, x + 18, 52), fill=COLOURS["yellow"], outline=(200, 150, 0))
        # clouds stay away from the sun's corner
        cloud_x = [112, 184] if self.sun == "left" else [112, 40]
        for x in cloud_x[: self.clouds]:
            for dx, dy, r in ((-14, 0, 11), (0, -6, 14), (14, 0, 11)):
                draw.ellipse((x + dx - r, 36 + dy - r, x + dx + r, 36 + dy + r), fill=WHITE)
        for obj in self.objects:
            _draw_ground_object(draw, obj)
        return image

    def object_phrases(self) -> list[str]:
        return [f"{_article(o.colour)} {o.colour} {o.kind}" for o in self.objects]

    def caption(self) -> str:
        sky = "A simple drawing of an outdoor scene with a blue sky above green grass."
        sky_line = ""
        clouds = ("", "one white cloud", "two white clouds")[self.clouds]
        if self.sun is not None:
            sky_line = f" A yellow sun shines in the top {self.sun} corner"
            sky_line += f" with {clouds} in the sky." if clouds else "."
        elif clouds:
            sky_line = f" There {'is' if self.clouds == 1 else 'are'} {clouds} in the sky."
        placed = [
            f"{phrase} {'in the middle' if o.slot == 1 else 'on the ' + SLOTS[o.slot]}"
            for phrase, o in zip(self.object_phrases(), self.objects, strict=True)
        ]
        return f"{sky}{sky_line} On the grass there is {_join(placed)}."


def _draw_ground_object(draw: ImageDraw.ImageDraw, obj: GroundObject) -> None:
    x = SLOT_X[obj.slot]
    fill = COLOURS[obj.colour]
    if obj.kind == "house":
        draw.rectangle((x - 28, 110, x + 28, 165), fill=fill, outline=BLACK, width=2)
        draw.polygon([(x - 34, 110), (x + 34, 110), (x, 78)], fill=(130, 60, 30), outline=BLACK)
        draw.rectangle((x - 7, 140, x + 7, 165), fill=(90, 50, 20))
    elif obj.kind == "tree":
        draw.rectangle((x - 5, 120, x + 5, 168), fill=(110, 70, 30))
        draw.ellipse((x - 24, 72, x + 24, 126), fill=(30, 120, 40), outline=(20, 80, 20))
    elif obj.kind == "car":
        draw.rectangle((x - 16, 128, x + 14, 144), fill=fill, outline=BLACK)
        draw.rectangle((x - 30, 142, x + 30, 162), fill=fill, outline=BLACK, width=2)
        for wx in (x - 18, x + 18):
            draw.ellipse((wx - 7, 156, wx + 7, 170), fill=BLACK)
    else:  # flower
        draw.line((x, 150, x, 176), fill=(30, 120, 40), width=3)
        for angle in range(0, 360, 60):
            px = x + 9 * math.cos(math.radians(angle))
            py = 140 + 9 * math.sin(math.radians(angle))
            draw.ellipse((px - 6, py - 6, px + 6, py + 6), fill=fill)
        draw.ellipse((x - 5, 135, x + 5, 145), fill=COLOURS["yellow"], outline=BLACK)


def _random_outdoor(rng: random.Random) -> OutdoorPicture:
    sun = rng.choice(("left", "right", None))
    clouds = rng.randint(0, 2)
    n = rng.randint(2, 3)
    kinds = rng.sample(sorted(GROUND_COLOURS), n)
    slots = sorted(rng.sample(range(3), n))
    objects = tuple(
        GroundObject(kind=k, colour=rng.choice(GROUND_COLOURS[k]), slot=s)
        for k, s in zip(kinds, slots, strict=True)
    )
    return OutdoorPicture(sun=sun, clouds=clouds, objects=objects)


def _image_captioning(rng: random.Random) -> Scene:
    picture = _random_outdoor(rng)
    return Scene(TOPICS[2], picture, ("Describe this image in detail.",), (picture.caption(),))


# --- chart understanding: a labelled bar or line chart ------------------------------------------


CHART_DATA = (  # title, noun for a label, labels
    ("Monthly sales", "month", ("Jan", "Feb", "Mar", "Apr", "May", "Jun")),
    ("Fruit sold", "fruit", ("Apples", "Pears", "Plums", "Kiwis", "Limes")),
    ("Visitors per year", "year", ("2019", "2020", "2021", "2022", "2023")),
    ("Rainy days", "city", ("Oslo", "Rome", "Lima", "Cairo", "Perth")),
)


@dataclass(frozen=True)
class ChartPicture:
    kind: str  # "bar" or "line"
    title: str
    labels: tuple[str, ...]
    values: tuple[int, ...]

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        left, right, top, bottom = 34, 214, 40, 186
        _text(draw, (SIZE / 2, 14), self.title, 14, BLACK)
        y_max = 5 * math.ceil(max(self.values) / 5)
        for tick in (0, y_max // 2, y_max):
            y = bottom - (bottom - top) * tick / y_max
            draw.line((left - 3, y, right, y), fill=(220, 220, 220))
            _text(draw, (left - 14, y), str(tick), 10, BLACK)
        draw.line((left, top - 4, left, bottom), fill=BLACK, width=2)
        draw.line((left, bottom, right, bottom), fill=BLACK, width=2)
        step = (right - left) / len(self.values)
        points = []
        for i, (label, value) in enumerate(zip(self.labels, self.values, strict=True)):
            cx = left + step * (i + 0.5)
            y = bottom - (bottom - top) * value / y_max
            points.append((cx, y))
            if self.kind == "bar":
                half = step * 0.3
                draw.rectangle((cx - half, y, cx + half, bottom), fill=COLOURS["blue"])
            _text(draw, (cx, y - 9), str(value), 11, BLACK)
            _text(draw, (cx, bottom + 12), label, 10, BLACK)
        if self.kind == "line":
            draw.line(points, fill=COLOURS["red"], width=2)
            for cx, y in points:
                draw.ellipse((cx - 4, y - 4, cx + 4, y + 4), fill=COLOURS["red"])
        return image


def _chart_understanding(rng: random.Random) -> Scene:
    title, noun, pool = rng.choice(CHART_DATA)
    n = rng.randint(3, 5)
    start = rng.randint(0, len(pool) - n)
    labels = pool[start : start + n]  # contiguous, so months and years stay in order
    values = tuple(rng.sample(range(2, 21), n))  # distinct, so highest/lowest are unambiguous
    picture = ChartPicture(rng.choice(("bar", "line")), title, labels, values)
    kind = rng.choice(("highest", "lowest", "value", "difference", "total"))
    if kind == "highest":
        question = f"According to the chart, which {noun} has the highest value?"
        answer = labels[values.index(max(values))]
    elif kind == "lowest":
        question = f"According to the chart, which {noun} has the lowest value?"
        answer = labels[values.index(min(values))]
    elif kind == "value":
        i = rng.randrange(n)
        question, answer = f"What is the value for {labels[i]} in the chart?", str(values[i])
    elif kind == "difference":
        i, j = rng.sample(range(n), 2)
        question = f"What is the difference between the values for {labels[i]} and {labels[j]}?"
        answer = str(abs(values[i] - values[j]))
    else:
        question, answer = "What is the sum of all values shown in the chart?", str(sum(values))
    return Scene(TOPICS[3], picture, (question,), (answer,))


# --- complex reasoning pro: multiple-choice diagram questions -----------------------------------


@dataclass(frozen=True)
class TrianglePicture:
    angle_p: int  # degrees at the bottom-left vertex P
    angle_q: int  # degrees at the bottom-right vertex Q

    @property
    def angle_r(self) -> int:
        return 180 - self.angle_p - self.angle_q

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        p, q = math.radians(self.angle_p), math.radians(self.angle_q)
        pr = math.sin(q) / math.sin(p + q)  # law of sines with PQ = 1
        vertices = [(0.0, 0.0), (1.0, 0.0), (pr * math.cos(p), pr * math.sin(p))]
        xs, ys = [v[0] for v in vertices], [v[1] for v in vertices]
        scale = min(160 / (max(xs) - min(xs)), 130 / (max(ys) - min(ys)))
        ox = (SIZE - scale * (max(xs) - min(xs))) / 2 - scale * min(xs)
        pts = [(ox + scale * x, 190 - scale * y) for x, y in vertices]
        draw.polygon(pts, outline=BLACK, width=2)
        gx, gy = sum(x for x, _ in pts) / 3, sum(y for _, y in pts) / 3
        angles = (f"{self.angle_p}°", f"{self.angle_q}°", "?")
        for (x, y), name, angle in zip(pts, "PQR", angles, strict=True):
            dx, dy = x - gx, y - gy
            norm = math.hypot(dx, dy) or 1.0
            _text(draw, (x + 14 * dx / norm, y + 14 * dy / norm), name, 16, BLACK)
            _text(draw, (x - 26 * dx / norm, y - 26 * dy / norm), angle, 12, COLOURS["blue"])
        return image


@dataclass(frozen=True)
class RectanglePicture:
    width: int  # side lengths in cm, as labelled
    height: int

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        scale = min(150 / self.width, 130 / self.height)
        w, h = self.width * scale, self.height * scale
        x0, y0 = (SIZE - w) / 2 - 10, (SIZE - h) / 2
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=(235, 240, 250), outline=BLACK, width=2)
        _text(draw, (x0 + w / 2, y0 + h + 12), f"{self.width} cm", 14, BLACK)
        _text(draw, (x0 + w + 24, y0 + h / 2), f"{self.height} cm", 14, BLACK)
        return image


@dataclass(frozen=True)
class DotSequencePicture:
    counts: tuple[int, ...]  # dots per box; the last box is drawn as "?"

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        box, gap = 46, 8
        x0 = (SIZE - (len(self.counts) * box + (len(self.counts) - 1) * gap)) / 2
        top = (SIZE - box) / 2
        for i, count in enumerate(self.counts):
            bx = x0 + i * (box + gap)
            draw.rectangle((bx, top, bx + box, top + box), outline=BLACK, width=2)
            if i == len(self.counts) - 1:
                _text(draw, (bx + box / 2, top + box / 2), "?", 24, BLACK)
                continue
            cols = math.ceil(math.sqrt(count))
            spacing = box / (cols + 1)
            for k in range(count):
                cx = bx + spacing * (k % cols + 1)
                cy = top + spacing * (k // cols + 1)
                draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=BLACK)
        return image


def _options(rng: random.Random, answer: int, candidates: list[int]) -> tuple[list[int], str]:
    """Four shuffled options (the answer and three distinct positive distractors) and the key."""
    pool = sorted({c for c in candidates if c > 0 and c != answer})
    extra = 1
    while len(pool) < 3:  # top up with near misses if the candidates collapsed
        pool = sorted({*pool, *(c for c in (answer + extra, answer - extra) if c > 0)} - {answer})
        extra += 1
    options = [answer, *rng.sample(pool, 3)]
    rng.shuffle(options)
    return options, "ABCD"[options.index(answer)]


def _multiple_choice(question: str, options: list[str]) -> str:
    lines = [f"{letter}. {option}" for letter, option in zip("ABCD", options, strict=True)]
    return "\n".join([question, *lines, MC_SUFFIX])


def _complex_reasoning(rng: random.Random) -> Scene:
    kind = rng.choice(("triangle", "rectangle", "sequence"))
    picture: Picture
    if kind == "triangle":
        p = rng.choice(range(35, 85, 5))
        q = rng.choice(range(35, min(85, 155 - p), 5))  # keeps angle R at least 25 degrees
        picture = TrianglePicture(p, q)
        r = 180 - p - q
        options, key = _options(rng, r, [r - 20, r - 10, r + 10, r + 20, 180 - p, 180 - q, p + q])
        question = (
            f"In triangle PQR shown in the diagram, angle P is {p}° and angle Q is {q}°. "
            "What is the measure of angle R?"
        )
        text = _multiple_choice(question, [f"{o}°" for o in options])
    elif kind == "rectangle":
        w, h = rng.sample(range(2, 13), 2)
        picture = RectanglePicture(w, h)
        if rng.random() < 0.5:
            answer, what, unit = w * h, "area", "cm²"
            candidates = [2 * (w + h), w * h + w, w * h - h, w + h, w * h + 2 * h]
        else:
            answer, what, unit = 2 * (w + h), "perimeter", "cm"
            candidates = [w * h, w + h, 2 * w + h, w + 2 * h, 2 * (w + h) + 2]
        options, key = _options(rng, answer, candidates)
        question = f"What is the {what} of the rectangle shown in the diagram?"
        text = _multiple_choice(question, [f"{o} {unit}" for o in options])
    else:
        start, step = rng.randint(1, 4), rng.randint(1, 3)
        counts = tuple(start + step * i for i in range(4))
        picture = DotSequencePicture(counts)
        answer = counts[-1]
        options, key = _options(rng, answer, [answer - 1, answer + 1, answer + step, answer - step])
        question = (
            "The number of dots in the boxes follows a pattern from left to right. "
            "How many dots belong in the box marked '?'?"
        )
        text = _multiple_choice(question, [str(o) for o in options])
    return Scene(TOPICS[4], picture, (text,), (key,))


# --- multi-turn conversation: 2 or 3 turns about one picture ------------------------------------


def _multi_turn(rng: random.Random) -> Scene:
    picture: Picture
    if rng.random() < 0.5:
        shapes = _random_shapes(rng)
        target = rng.choice(shapes.shapes)
        picture = shapes
        turns = (
            "Describe the shapes in this image.",
            f"What shape is at the {target.position} of the image?",
            "What colour is it?",
        )
        references = (shapes.describe(), target.kind, target.colour)
    else:
        outdoor = _random_outdoor(rng)
        target_obj = rng.choice(outdoor.objects)
        picture = outdoor
        turns = (
            "What objects can you see on the grass in this picture?",
            f"What colour is the {target_obj.kind}?",
            "Is it on the left, in the middle or on the right of the picture?",
        )
        references = (
            _join(outdoor.object_phrases()) + ".",
            target_obj.colour,
            "in the middle" if target_obj.slot == 1 else f"on the {SLOTS[target_obj.slot]}",
        )
    n = rng.choice((2, 3))
    return Scene(TOPICS[5], picture, turns[:n], references[:n])


_GENERATORS: dict[str, Callable[[random.Random], Scene]] = {
    TOPICS[0]: _general_vqa,
    TOPICS[1]: _text_vqa,
    TOPICS[2]: _image_captioning,
    TOPICS[3]: _chart_understanding,
    TOPICS[4]: _complex_reasoning,
    TOPICS[5]: _multi_turn,
}


# --- public API ---------------------------------------------------------------------------------


def _scenes(per_topic: int, seed: int, topics: Sequence[str] | None) -> list[tuple[str, Scene]]:
    """(sample id, scene) pairs in TOPICS order; no image is drawn here."""
    if isinstance(per_topic, bool) or not isinstance(per_topic, int) or per_topic < 1:
        raise WorkloadError(f"synthetic suite: per_topic must be a positive integer: {per_topic!r}")
    if topics is not None:
        if isinstance(topics, str):
            raise WorkloadError(f"synthetic suite: topics must be a list, got {topics!r}")
        for topic in topics:
            if topic not in _GENERATORS:
                raise WorkloadError(
                    f"synthetic suite: unknown topic {topic!r}; allowed: {list(TOPICS)}"
                )
    scenes = []
    for topic in TOPICS:
        if topics is not None and topic not in topics:
            continue
        generate = _GENERATORS[topic]
        slug = topic.replace(" ", "-")
        for index in range(per_topic):
            # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
            # (unlike hash()), and each sample is independent of how many come after it.
            rng = random.Random(f"mmspec-synthetic:{seed}:{topic}:{index}")
            scenes.append((f"syn_{slug}_{index:03d}", generate(rng)))
    return scenes


def synthetic_items(
    per_topic: int = 10, seed: int = 0, topics: Sequence[str] | None = None
) -> list[SyntheticItem]:
    """Samples with the scenes they were drawn from, `per_topic` per topic, in TOPICS order.

    `topics` restricts the suite to some topics (only those images are drawn); a sample is
    the same whichever other topics are drawn with it.
    """
    items = []
    for sample_id, scene in _scenes(per_topic, seed, topics):
        sample = Sample(
            id=sample_id,
            topic=scene.topic,
            category=CATEGORY,
            turns=scene.turns,
            image_bytes=_png(scene.picture.draw()),
            image_name=f"synthetic:{sample_id}.png",
        )
        items.append(SyntheticItem(sample=sample, scene=scene))
    return items


def synthetic_suite(
    per_topic: int = 10, seed: int = 0, topics: Sequence[str] | None = None
) -> list[Sample]:
    """The built-in six-topic suite: `per_topic` samples per topic, identical for equal args."""
    return [item.sample for item in synthetic_items(per_topic, seed, topics)]


def synthetic_references(
    per_topic: int = 10, seed: int = 0, topics: Sequence[str] | None = None
) -> dict[str, tuple[str, ...]]:
    """Reference answer(s) per sample id, one per turn, known exactly from each scene."""
    return {sample_id: scene.references for sample_id, scene in _scenes(per_topic, seed, topics)}
