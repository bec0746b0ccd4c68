"""Calibration prompts: a built-in set, and prompt files (txt, tsv).

Static activation scales and smoothing factors are only as good as the activations
they were observed on. The field calibrates on COCO captions, which cannot be
downloaded offline, so qcompile ships its own set, written for this project to span
what diffusion users ask for: people, animals, places, architecture, food, objects,
vehicles, art styles, lighting, text in the image, abstract and technical scenes,
short and long prompts.
"""

from __future__ import annotations

import csv
from pathlib import Path

from qcompile.calibration import CalibrationError

CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a portrait of an elderly fisherman with a weathered face, soft window light",
    "a golden retriever puppy asleep on a wool blanket",
    "a misty pine forest at dawn, rays of light between the trunks",
    "the skyline of a coastal city at night, reflections on wet asphalt",
    "a bowl of ramen with a soft-boiled egg and scallions, top-down photo",
    "an astronaut tending a vegetable garden inside a glass dome on mars",
    "a watercolor painting of a lighthouse on a rocky shore",
    "a close-up of a hummingbird drinking from a red flower, shallow depth of field",
    "a cozy reading nook with a bay window, rain outside, warm lamp",
    "a vintage red bicycle leaning against a yellow wall in a narrow street",
    "an isometric illustration of a tiny island with a windmill",
    "a snowy mountain ridge under a starry sky, long exposure",
    "a street market in the evening, lanterns, crowds, steam from food stalls",
    "a chess board mid-game on a marble table, dramatic side lighting",
    "a neon sign that says OPEN 24 HOURS in a rainy alley",
    "a child building a sandcastle at low tide, pastel colors",
    "a detailed pencil sketch of a cathedral facade",
    "an underwater coral reef with a sea turtle and schools of fish",
    "a minimalist living room with concrete walls and a single green plant",
    "a fox in a snowy field, looking over its shoulder",
    "a steaming cup of coffee on a windowsill, morning light, bokeh",
    "a medieval knight in ornate armor standing in a field of wildflowers",
    "a futuristic train station with curved white architecture",
    "a bowl of fresh fruit in the style of a dutch still life painting",
    "a desert canyon with layered red rock and a winding river",
    "a robot barista pouring latte art in a busy cafe",
    "a macro photo of a dewdrop on a spider web",
    "an old library with towering shelves and a rolling ladder",
    "a hot air balloon festival over green hills at sunrise",
    "a black and white photo of a jazz trio playing in a smoky club",
    "a paper cut-out style scene of a village under the full moon",
    "a bustling harbor with fishing boats and seagulls",
    "a close-up portrait of a tabby cat with green eyes",
    "a stained glass window depicting a tree of life",
    "a poster with the words SUMMER SALE in bold retro letters",
    "a rainy tokyo crossing seen from above, umbrellas of many colors",
    "a cabin by a frozen lake, smoke from the chimney, northern lights",
    "an oil painting of a stormy sea with a sailing ship",
    "a plate of sushi arranged on a slate board, studio lighting",
    "a field of sunflowers under a bright blue sky",
    "a cyberpunk street vendor selling noodles, holographic signs",
    "a pair of worn leather boots on a wooden porch",
    "a herd of elephants crossing a dusty savanna at sunset",
    "a 3d render of a glossy ceramic teapot on a turquoise background",
    "a gothic castle on a cliff, thunderstorm, lightning",
    "a botanical illustration of a fern with labeled parts",
    "a young woman reading on a subway train, candid photo",
    "a mountain village with terraced rice fields",
    "a bowl of tomato soup with basil and a slice of bread",
    "an abstract composition of overlapping translucent circles",
    "a vintage sports car parked on a coastal road",
    "a close-up of hands kneading bread dough on a floured table",
    "a snow leopard resting on a rocky ledge",
    "a children's book illustration of a bear having a picnic",
    "a busy airport terminal with large windows and planes outside",
    "a japanese garden with a koi pond and a red bridge",
    "a blueprint drawing of a steam locomotive",
    "a glass of red wine on a table at a candlelit dinner",
    "a surreal landscape with floating rocks and waterfalls",
    "a group of friends laughing around a campfire at night",
    "an owl perched on a branch under a full moon",
    "a modern kitchen with white cabinets and copper pans",
    "a pixel art scene of a castle and a dragon",
    "a lone tree on a hill in a wheat field, golden hour",
    "a close-up of a mechanical watch movement with gears",
    "a colorful hot sauce label design with a chili pepper mascot",
    "a sleepy town square in italy with a fountain and cafes",
    "a polar bear swimming under arctic ice, blue light",
    "a chalkboard menu in a bakery listing croissants and coffee",
    "a charcoal drawing of a dancer mid-leap",
    "a bowl of ripe cherries, high key photography",
    "aerial view of a winding river through autumn forests",
)


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: `.txt` (one per line; blank lines and lines starting with
    `#` are skipped) or `.tsv` (a header row with a `caption` column, as caption
    datasets have)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"prompt file {path} is not UTF-8 text ({exc})") from None
    if path.suffix.lower() == ".tsv":
        prompts = _tsv_captions(path, text)
    else:
        lines = (line.strip() for line in text.splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise CalibrationError(f"prompt file {path} holds no prompts")
    return prompts


def _tsv_captions(path: Path, text: str) -> list[str]:
    rows = csv.DictReader(text.splitlines(), delimiter="\t")
    columns = [c.strip().lower() for c in rows.fieldnames or []]
    if "caption" not in columns:
        raise CalibrationError(
            f"prompt file {path} has no 'caption' column (columns: {rows.fieldnames}); "
            "a .tsv needs a header row naming it, or use a .txt with one prompt per line"
        )
    key = (rows.fieldnames or [])[columns.index("caption")]
    return [row[key].strip() for row in rows if (row.get(key) or "").strip()]
