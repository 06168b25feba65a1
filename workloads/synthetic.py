"""The built-in synthetic suite: six MMSpec topics drawn with Pillow, no data download needed.

Each sample comes from a small structured picture (shapes, a sign, an outdoor scene, a chart, a
diagram) plus questions about it, so the reference answer is known exactly from the picture.
Everything is drawn from a per-sample random generator seeded by (split, seed, topic, index):
the same arguments give the same PNG bytes on every call, and a larger `per_topic` only
appends samples.

Reference answers are written from the ground truth with MMSpec's output-length proportions
(mean answer tokens 47, 63, 192, 69, 286 and 748 for general vqa ... multi-turn, scaled by about
1/8), and they mark which characters came from the pixels (`Scene.grounded`): a colour, a
count, a word on a sign, a chart value. Everything else in an answer follows from the question.

Two splits: `eval` (the embedded default the benchmark runs) and `train` (what the tiny models
are trained on). A scene belongs to exactly one split by a hash of its content, so no eval
picture-and-question ever appears in training, whatever the seeds or sizes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from PIL import Image, ImageDraw, ImageFont

from .errors import WorkloadError
from .sample import TOPICS, Sample

SIZE = 224  # small enough to keep the suite cheap, the size many vision towers expect
CATEGORY = "synthetic"
SPLITS = ("eval", "train")
Split = Literal["eval", "train"]
# One scene in EVAL_BUCKETS (by content hash) is held out for eval; the rest may be trained on.
EVAL_BUCKETS = 4

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
# A 2x2 grid: each cell is exactly the 2x2 block of image tokens a 112 px tiny vision tower
# makes of it, so a shape's features do not depend on where it sits.
ROWS = ("top", "bottom")
COLS = ("left", "right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."

# Grounded spans are written inline as OPEN text CLOSE and stripped by `_unmark`.
_OPEN, _CLOSE = "\x02", "\x03"
Span = tuple[int, int]  # [start, end) character offsets into a reference answer


class Picture(Protocol):
    """A structured picture: its fields are the ground truth the questions are asked about."""

    def draw(self) -> Image.Image: ...


@dataclass(frozen=True)
class Scene:
    """One synthetic prompt: a picture, the user turns about it and one reference per turn.

    `grounded[t]` lists the character spans of `references[t]` that can only be read off the
    picture (a colour, a count, a word, a value); every other character follows from the
    question and the answer template.
    """

    topic: str
    picture: Picture
    turns: tuple[str, ...]
    references: tuple[str, ...]
    grounded: tuple[tuple[Span, ...], ...] = ()


@dataclass(frozen=True)
class SyntheticItem:
    """A sample together with the scene it was drawn from (for reference answers)."""

    sample: Sample
    scene: Scene


# --- answer markup ---------------------------------------------------------------------------


def _g(value: object) -> str:
    """Mark `value` as read off the picture."""
    return f"{_OPEN}{value}{_CLOSE}"


def _unmark(marked: str) -> tuple[str, tuple[Span, ...]]:
    """Strip the grounding marks: the plain answer and its grounded character spans."""
    text: list[str] = []
    spans: list[Span] = []
    start = 0
    length = 0
    for ch in marked:
        if ch == _OPEN:
            start = length
        elif ch == _CLOSE:
            spans.append((start, length))
        else:
            text.append(ch)
            length += 1
    return "".join(text), tuple(spans)


def _scene(topic: str, picture: Picture, turns: Sequence[str], marked: Sequence[str]) -> Scene:
    plain = [_unmark(m) for m in marked]
    return Scene(
        topic,
        picture,
        tuple(turns),
        tuple(text for text, _ in plain),
        tuple(spans for _, spans in plain),
    )


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


def _fit_size(draw: ImageDraw.ImageDraw, text: str, width: int, start: int) -> int:
    size = start
    while size > 8 and _text_size(draw, text, size)[0] > width:
        size -= 1
    return size


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No metadata and a fixed compression level keep the bytes identical across calls.
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- general vqa: coloured shapes on a 2x2 grid -------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPE_KINDS
    colour: str  # key of COLOURS
    row: int  # index into ROWS
    col: int  # index into COLS

    @property
    def position(self) -> str:
        return f"{ROWS[self.row]} {COLS[self.col]}"

    @property
    def marked_position(self) -> str:
        # row and column are separate facts: after "top", "left" still needs the picture
        return f"{_g(ROWS[self.row])} {_g(COLS[self.col])}"


@dataclass(frozen=True)
class ShapesPicture:
    shapes: tuple[Shape, ...]

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        cell = SIZE / 2
        r = 38  # big, thick-outlined shapes survive the 2x downscale of tiny vision towers
        for s in self.shapes:
            cx, cy = (s.col + 0.5) * cell, (s.row + 0.5) * cell
            fill = COLOURS[s.colour]
            if s.kind == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=4)
            elif s.kind == "square":
                draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=BLACK, width=4)
            elif s.kind == "triangle":
                points = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
                draw.polygon(points, fill=fill, outline=BLACK, width=4)
            else:  # diamond
                points = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
                draw.polygon(points, fill=fill, outline=BLACK, width=4)
        return image

    def reading_order(self) -> list[Shape]:
        return sorted(self.shapes, key=lambda s: (s.row, s.col))

    def describe(self) -> str:
        """A marked description: the count, then every shape in reading order."""
        lines = [f"There are {_g(len(self.shapes))} shapes on a white background."]
        lines += [
            f"At the {s.marked_position} there is {_article(s.colour)} {_g(s.colour)} "
            f"{_g(s.kind)} with a black outline."
            for s in self.reading_order()
        ]
        if len(self.shapes) < len(ROWS) * len(COLS):
            lines.append("The other cells of the grid are empty.")
        return " ".join(lines)


def _random_shapes(rng: random.Random) -> ShapesPicture:
    n = rng.randint(2, 4)
    cells = rng.sample(range(4), n)
    colours = rng.sample(sorted(COLOURS), n)  # unique: a colour names one shape
    kinds = [rng.choice(SHAPE_KINDS) for _ in range(n)]
    shapes = tuple(
        Shape(kind=k, colour=c, row=cell // 2, col=cell % 2)
        for k, c, cell in zip(kinds, colours, cells, strict=True)
    )
    return ShapesPicture(shapes)


def _general_vqa(rng: random.Random) -> Scene:
    # Every question is answerable by looking in one place (a cell, or the cell of a colour)
    # or by counting filled cells, as GQA's short questions mostly are; colours are unique per
    # picture (`_random_shapes`), so "the red shape" names one shape.
    picture = _random_shapes(rng)
    shapes = picture.shapes
    target = rng.choice(shapes)
    kind = rng.choice(("colour_at", "shape_at", "count", "where"))
    if kind == "colour_at":
        question = f"What colour is the shape at the {target.position}?"
        answer = f"The shape at the {target.position} is {_g(target.colour)}."
    elif kind == "shape_at":
        question = f"What shape is at the {target.position} of the image?"
        answer = f"It is a {_g(target.kind)}."
    elif kind == "where":
        question = f"Where is the {target.colour} shape in the image?"
        answer = f"The {target.colour} shape is at the {target.marked_position}."
    else:
        question = "How many shapes are there in the image?"
        answer = f"There are {_g(len(shapes))} shapes."
    return _scene(TOPICS[0], picture, (question,), (answer,))


# --- text vqa: a sign with a word or number ----------------------------------------------------


SIGN_FRAMES = ("red", "green", "blue", "orange")  # frame colours; the board is always white
# Four letters, one per column of the 4x4 token grid of the tiny vision towers, each glyph
# two tokens tall: reading a sign is recognising big black glyphs on white, token by token,
# as OCR-capable encoders see a word. No wide letters (M, W), so every glyph fits its column.
SIGN_WORDS = (
    "STOP",
    "OPEN",
    "EXIT",
    "CAFE",
    "BANK",
    "TAXI",
    "PARK",
    "SHOP",
    "GATE",
    "FOOD",
    "BOOK",
    "LIFT",
)
SIGN_HEADINGS = {"speed": "SPEED LIMIT", "price": "SALE PRICE $", "platform": "PLATFORM"}
GLYPH = 96  # font size of a sign's big characters: one glyph about fills its column


@dataclass(frozen=True)
class SignPicture:
    heading: str  # small text in the top row of tokens ("" for none)
    glyphs: str  # big characters in rows 2-3, one per column; two characters use the middle two
    frame: str  # key of COLOURS

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), WHITE)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 0, SIZE - 1, SIZE - 1), outline=COLOURS[self.frame], width=6)
        cell = SIZE / 4
        if self.heading:
            size = _fit_size(draw, self.heading, SIZE - 24, 24)
            _text(draw, (SIZE / 2, cell / 2), self.heading, size, BLACK)
        first = (4 - len(self.glyphs)) // 2
        for i, glyph in enumerate(self.glyphs):
            _text(draw, ((first + i + 0.5) * cell, 2 * cell), glyph, GLYPH, BLACK)
        return image


def _text_vqa(rng: random.Random) -> Scene:
    frame = rng.choice(SIGN_FRAMES)
    kind = rng.choice(("word", "word", "speed", "price", "platform"))
    if kind == "word":
        word = rng.choice(SIGN_WORDS)
        picture = SignPicture("", word, frame)
        question = "What word is written on the sign?"
        answer = f"The word on the sign is {_g(word)}."
    elif kind == "speed":
        limit = rng.choice(range(20, 100, 5))
        picture = SignPicture(SIGN_HEADINGS[kind], str(limit), frame)
        question = "What speed limit is shown on the sign?"
        answer = f"The speed limit is {_g(limit)} km/h."
    elif kind == "price":
        price = rng.randint(10, 99)
        picture = SignPicture(SIGN_HEADINGS[kind], str(price), frame)
        question = "What price is shown on the sign?"
        answer = f"The price is ${_g(price)}."
    else:
        number = rng.randint(10, 39)
        picture = SignPicture(SIGN_HEADINGS[kind], str(number), frame)
        question = "Which platform number is written on the sign?"
        answer = f"This is platform number {_g(number)}."
    return _scene(TOPICS[1], picture, (question,), (answer,))


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

    def marked_place(self) -> str:
        return f"in the {_g('middle')}" if self.slot == 1 else f"on the {_g(SLOTS[self.slot])}"

    def marked_phrase(self) -> str:
        return f"{_article(self.colour)} {_g(self.colour)} {_g(self.kind)} {self.marked_place()}"


@dataclass(frozen=True)
class OutdoorPicture:
    sun: str  # "left" / "right" corner of the sky
    clouds: int  # 1..2
    objects: tuple[GroundObject, ...]

    def draw(self) -> Image.Image:
        image = Image.new("RGB", (SIZE, SIZE), SKY)
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, 150, SIZE, SIZE), fill=GRASS)
        x = 34 if self.sun == "left" else SIZE - 34
        draw.ellipse((x - 20, 14, x + 20, 54), fill=COLOURS["yellow"], outline=(200, 150, 0))
        # clouds stay away from the sun's corner
        cloud_x = [112, 184] if self.sun == "left" else [112, 40]
        for x in cloud_x[: self.clouds]:
            for dx, dy, r in ((-14, 0, 11), (0, -6, 14), (14, 0, 11)):
                draw.ellipse((x + dx - r, 36 + dy - r, x + dx + r, 36 + dy + r), fill=WHITE)
        for obj in self.objects:
            _draw_ground_object(draw, obj)
        return image

    def marked_sky(self) -> str:
        clouds = _g(NUMBER_WORDS[self.clouds])
        noun = "cloud" if self.clouds == 1 else "clouds"
        return f"The sun is in the top {_g(self.sun)} corner, next to {clouds} white {noun}."

    def caption(self) -> str:
        objects = _join([o.marked_phrase() for o in self.objects])
        return f"{objects[0].upper()}{objects[1:]}. The sun is at the top {_g(self.sun)}."


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
            px = x + 10 * math.cos(math.radians(angle))
            py = 138 + 10 * math.sin(math.radians(angle))
            draw.ellipse((px - 7, py - 7, px + 7, py + 7), fill=fill)
        draw.ellipse((x - 5, 133, x + 5, 143), fill=COLOURS["yellow"], outline=BLACK)


def _random_outdoor(rng: random.Random) -> OutdoorPicture:
    sun = rng.choice(("left", "right"))
    clouds = rng.randint(1, 2)
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
    return _scene(TOPICS[2], picture, ("Describe this image in detail.",), (picture.caption(),))


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
        left, right, top, bottom = 30, 216, 48, 192
        _text(draw, (SIZE / 2, 14), self.title, 18, BLACK)
        y_max = 5 * math.ceil(max(self.values) / 5)
        draw.line((left, top - 4, left, bottom), fill=BLACK, width=2)
        draw.line((left, bottom, right, bottom), fill=BLACK, width=2)
        step = (right - left) / len(self.values)
        points = []
        for i, (label, value) in enumerate(zip(self.labels, self.values, strict=True)):
            cx = left + step * (i + 0.5)
            y = bottom - (bottom - top) * value / y_max
            points.append((cx, y))
            if self.kind == "bar":
                half = step * 0.32
                draw.rectangle((cx - half, y, cx + half, bottom), fill=COLOURS["blue"])
            _text(draw, (cx, y - 12), str(value), 18, BLACK)
            _text(draw, (cx, bottom + 14), label, _fit_size(draw, label, int(step) - 2, 16), BLACK)
        if self.kind == "line":
            draw.line(points, fill=COLOURS["red"], width=3)
            for cx, y in points:
                draw.ellipse((cx - 5, y - 5, cx + 5, y + 5), fill=COLOURS["red"])
        return image


def _chart_understanding(rng: random.Random) -> Scene:
    title, noun, pool = rng.choice(CHART_DATA)
    n = rng.randint(3, 5)
    start = rng.randint(0, len(pool) - n)
    labels = pool[start : start + n]  # contiguous, so months and years stay in order
    values = tuple(rng.sample(range(2, 21), n))  # distinct, so highest/lowest are unambiguous
    picture = ChartPicture(rng.choice(("bar", "line")), title, labels, values)
    kind = rng.choice(("highest", "lowest", "value", "count"))
    if kind == "highest":
        question = f"According to the chart, which {noun} has the highest value?"
        best = values.index(max(values))
        answer = f"It is {_g(labels[best])}, with {_g(values[best])}."
    elif kind == "lowest":
        question = f"According to the chart, which {noun} has the lowest value?"
        worst = values.index(min(values))
        answer = f"It is {_g(labels[worst])}, with {_g(values[worst])}."
    elif kind == "value":
        i = rng.randrange(n)
        question = f"What is the value for {labels[i]} in the chart?"
        answer = f"The value for {labels[i]} is {_g(values[i])}."
    else:
        mark = "bars" if picture.kind == "bar" else "points"
        question = f"How many {noun}s does the chart show?"
        answer = f"The {picture.kind} chart shows {_g(n)} {mark}."
    return _scene(TOPICS[3], picture, (question,), (answer,))


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
        scale = min(140 / self.width, 120 / self.height)
        w, h = self.width * scale, self.height * scale
        x0, y0 = (SIZE - w) / 2 - 16, (SIZE - h) / 2 - 8
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=(235, 240, 250), outline=BLACK, width=2)
        _text(draw, (x0 + w / 2, y0 + h + 16), f"{self.width} cm", 20, BLACK)
        _text(draw, (x0 + w + 32, y0 + h / 2), f"{self.height} cm", 20, BLACK)
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
        # the angles are in the question, so nothing here needs the picture
        answer = (
            f"The angles of a triangle add up to 180°, so angle R is 180° - {p}° - {q}° = "
            f"{r}°. The answer is {key}."
        )
    elif kind == "rectangle":
        w, h = rng.sample(range(2, 13), 2)
        picture = RectanglePicture(w, h)
        sides = f"The rectangle is {_g(w)} cm by {_g(h)} cm."
        if rng.random() < 0.5:
            value, what, unit = w * h, "area", "cm²"
            candidates = [2 * (w + h), w * h + w, w * h - h, w + h, w * h + 2 * h]
            working = f"Its area is {w} × {h} = {value} cm²."
        else:
            value, what, unit = 2 * (w + h), "perimeter", "cm"
            candidates = [w * h, w + h, 2 * w + h, w + 2 * h, 2 * (w + h) + 2]
            working = f"Its perimeter is 2 × ({w} + {h}) = {value} cm."
        options, key = _options(rng, value, candidates)
        question = f"What is the {what} of the rectangle shown in the diagram?"
        text = _multiple_choice(question, [f"{o} {unit}" for o in options])
        answer = f"{sides} {working} The answer is {key}."
    else:
        start, step = rng.randint(1, 4), rng.randint(1, 3)
        counts = tuple(start + step * i for i in range(4))
        picture = DotSequencePicture(counts)
        value = counts[-1]
        options, key = _options(rng, value, [value - 1, value + 1, value + step, value - step])
        question = (
            "The number of dots in the boxes follows a pattern from left to right. "
            "How many dots belong in the box marked '?'?"
        )
        text = _multiple_choice(question, [str(o) for o in options])
        seen = _join([_g(c) for c in counts[:-1]])
        answer = (
            f"The boxes hold {seen} dots, so each box adds {step}. The box marked '?' holds "
            f"{counts[2]} + {step} = {value} dots. The answer is {key}."
        )
    return _scene(TOPICS[4], picture, (text,), (answer,))


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
        references = (
            shapes.describe(),
            f"The shape at the {target.position} of the image is a {_g(target.kind)}. "
            f"It has a black outline, like every other shape in the picture.",
            f"The {target.kind} at the {target.position} is {_g(target.colour)}. "
            f"It is {_article(target.colour)} {target.colour} {target.kind} on a white background.",
        )
    else:
        outdoor = _random_outdoor(rng)
        target_obj = rng.choice(outdoor.objects)
        picture = outdoor
        turns = (
            "What objects can you see on the grass in this picture?",
            f"What colour is the {target_obj.kind}?",
            "Is it on the left, in the middle or on the right of the picture?",
        )
        count = _g(NUMBER_WORDS[len(outdoor.objects)])
        objects = [
            f"{_article(o.colour)} {_g(o.colour)} {_g(o.kind)} {o.marked_place()}"
            for o in outdoor.objects
        ]
        references = (
            f"I can see {count} objects on the green grass: {_join(objects)}. "
            f"Above them is a blue sky. {outdoor.marked_sky()} Nothing else is in the picture.",
            f"The {target_obj.kind} is {_g(target_obj.colour)}. It stands on the green grass "
            f"under the blue sky.",
            f"The {target_obj.kind} is {target_obj.marked_place()} of the picture. "
            f"There are {len(outdoor.objects)} objects on the grass in all.",
        )
    n = rng.choice((2, 3))
    return _scene(TOPICS[5], picture, turns[:n], references[:n])


_GENERATORS: dict[str, Callable[[random.Random], Scene]] = {
    TOPICS[0]: _general_vqa,
    TOPICS[1]: _text_vqa,
    TOPICS[2]: _image_captioning,
    TOPICS[3]: _chart_understanding,
    TOPICS[4]: _complex_reasoning,
    TOPICS[5]: _multi_turn,
}


# --- splits -------------------------------------------------------------------------------------


def scene_split(scene: Scene) -> Split:
    """The split a scene belongs to, from a hash of its picture and questions.

    The pictures are frozen dataclasses of ints and strings, so their repr is a stable,
    complete key; equal scenes therefore always land in the same split.
    """
    key = repr((scene.topic, scene.picture, scene.turns)).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


def _draw_scene(
    generate: Callable[[random.Random], Scene], rng: random.Random, split: str
) -> Scene:
    # Redraw until the scene falls in the wanted split: each split is a fixed part of the
    # scene space, so eval and train never share a scene whatever their seeds and sizes.
    while True:
        scene = generate(rng)
        if scene_split(scene) == split:
            return scene


# --- public API ---------------------------------------------------------------------------------


def _check(per_topic: int, topics: Sequence[str] | None, split: str) -> None:
    if isinstance(per_topic, bool) or not isinstance(per_topic, int) or per_topic < 1:
        raise WorkloadError(f"synthetic suite: per_topic must be a positive integer: {per_topic!r}")
    if split not in SPLITS:
        raise WorkloadError(f"synthetic suite: split must be one of {list(SPLITS)}: {split!r}")
    if topics is not None:
        if isinstance(topics, str):
            raise WorkloadError(f"synthetic suite: topics must be a list, got {topics!r}")
        for topic in topics:
            if topic not in _GENERATORS:
                raise WorkloadError(
                    f"synthetic suite: unknown topic {topic!r}; allowed: {list(TOPICS)}"
                )


def _scenes(
    per_topic: int, seed: int, topics: Sequence[str] | None, split: str, start: int = 0
) -> list[tuple[str, Scene]]:
    """(sample id, scene) pairs in TOPICS order; no image is drawn here."""
    _check(per_topic, topics, split)
    prefix = "syn" if split == "eval" else "syn-train"
    scenes = []
    for topic in TOPICS:
        if topics is not None and topic not in topics:
            continue
        generate = _GENERATORS[topic]
        slug = topic.replace(" ", "-")
        for index in range(start, start + per_topic):
            # A string seed is hashed with SHA-512 by `random`, so it is stable across processes
            # (unlike hash()), and each sample is independent of how many come after it.
            rng = random.Random(f"mmspec-synthetic:{split}:{seed}:{topic}:{index}")
            scenes.append((f"{prefix}_{slug}_{index:03d}", _draw_scene(generate, rng, split)))
    return scenes


def synthetic_scenes(
    per_topic: int = 10,
    seed: int = 0,
    topics: Sequence[str] | None = None,
    split: Split = "eval",
    start: int = 0,
) -> list[tuple[str, Scene]]:
    """(sample id, scene) pairs without drawing any image: the ground truth only."""
    return _scenes(per_topic, seed, topics, split, start)


def synthetic_items(
    per_topic: int = 10,
    seed: int = 0,
    topics: Sequence[str] | None = None,
    split: Split = "eval",
    start: int = 0,
) -> list[SyntheticItem]:
    """Samples with the scenes they were drawn from, `per_topic` per topic, in TOPICS order.

    `topics` restricts the suite to some topics (only those images are drawn); a sample is
    the same whichever other topics are drawn with it. `start` skips the first indices of
    each topic, so a long training stream can be drawn in chunks.
    """
    items = []
    for sample_id, scene in _scenes(per_topic, seed, topics, split, start):
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
    per_topic: int = 10,
    seed: int = 0,
    topics: Sequence[str] | None = None,
    split: Split = "eval",
) -> list[Sample]:
    """The built-in six-topic suite: `per_topic` samples per topic, identical for equal args."""
    return [item.sample for item in synthetic_items(per_topic, seed, topics, split)]


def synthetic_references(
    per_topic: int = 10,
    seed: int = 0,
    topics: Sequence[str] | None = None,
    split: Split = "eval",
) -> dict[str, tuple[str, ...]]:
    """Reference answer(s) per sample id, one per turn, known exactly from each scene."""
    return {sid: scene.references for sid, scene in _scenes(per_topic, seed, topics, split)}
