"""A deterministic, offline image-classification task: coloured shapes on noise.

``data.path = "synthetic:shapes"`` generates, in memory, 32 x 32 PNG images of one of four
shapes (circle, square, triangle, cross) at a random place and size on a noisy background. Each
class has its own colour most of the time (``colour_noise`` of the images take another class's
colour), so a model can learn the task from the shape, from the colour, or both: a tiny random
ViT or CLIP learns it in a few federated rounds, which is what the image quickstart and the
tests need. It is synthetic: say so wherever its numbers are reported.
"""

from __future__ import annotations

import io

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230), "cross": (230, 210, 40)}
SIZE = 32


def _draw(draw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> None:
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)
    else:
        width = max(2, (right - left) // 4)
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        draw.rectangle((mid_x - width // 2, top, mid_x + width // 2, bottom), fill=colour)
        draw.rectangle((left, mid_y - width // 2, right, mid_y + width // 2), fill=colour)


def shape_image(rng: np.random.Generator, shape: str, colour: tuple[int, int, int], size: int = SIZE) -> bytes:
    """One PNG: ``shape`` in ``colour`` (jittered) at a random place and size on uniform noise."""
    from PIL import Image, ImageDraw

    noise = rng.integers(0, 140, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    extent = int(rng.integers(size // 3, size - 4))
    left, top = (int(v) for v in rng.integers(0, size - extent, size=2))
    jitter = rng.integers(-25, 26, size=3)
    tint = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    _draw(ImageDraw.Draw(img), shape, (left, top, left + extent, top + extent), tint)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def generate_shapes(num_examples: int, seed: int = 0, colour_noise: float = 0.2) -> dict[str, list]:
    """``num_examples`` rows of ``image`` (``{"bytes", "path"}`` cells, PNG) and ``label`` (the
    shape's name), balanced over :data:`SHAPES` and shuffled; the same for the same seed."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in rng.permutation(num_examples):
        shape = SHAPES[int(i) % len(SHAPES)]
        colour = COLOURS[shape]
        if rng.random() < colour_noise:
            colour = COLOURS[SHAPES[int(rng.integers(len(SHAPES)))]]
        images.append({"bytes": shape_image(rng, shape, colour), "path": None})
        labels.append(shape)
    return {"image": images, "label": labels}


# ``synthetic:<name>`` in data.path for image tasks, beside the text ones of fedlora.data.synthetic.
IMAGE_GENERATORS = {"shapes": generate_shapes}
