"""The calibration prompt set: 144 prompts written for this toolkit, spread over subjects
(people, animals, places, objects, food, vehicles, abstract), styles (photographs, paintings,
drawings, 3-D renders, graphic design, text in images) and lengths (two words to a paragraph),
so that the activation statistics cover what users ask for. ``--prompts FILE`` replaces them
(one prompt per line; blank lines and lines starting with ``#`` are skipped)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import BitDanceError

PROMPTS = (
    # short
    "a red apple",
    "a lighthouse at dusk",
    "snowy mountains",
    "a sleeping cat",
    "city skyline at night",
    "a bowl of ramen",
    "an old bicycle",
    "sunflowers",
    "a paper boat",
    "a foggy forest",
    "two horses running",
    "a blue door",
    "a cup of coffee",
    "desert dunes",
    "a violin",
    "an astronaut",
    # photographs: people
    "portrait of an elderly fisherman with a grey beard, natural light, 85mm lens",
    "a young woman laughing in the rain holding a yellow umbrella, street photography",
    "a chef plating a dessert in a busy restaurant kitchen, shallow depth of field",
    "close-up of a child's hands holding a ladybug, macro photograph",
    "a marathon runner crossing the finish line, motion blur, crowd cheering",
    "a jazz saxophonist performing on a dim stage with blue spotlights",
    "a farmer standing in a rice paddy at sunrise, mist over the water",
    "black and white portrait of a dancer mid-leap, high contrast",
    "an old couple sitting on a park bench feeding pigeons in autumn",
    "a surfer riding a huge turquoise wave, aerial drone shot",
    "a blacksmith hammering glowing metal, sparks flying, dark workshop",
    "a group of friends around a campfire under a starry sky",
    # photographs: animals
    "a red fox in fresh snow looking at the camera",
    "a humpback whale breaching at sunset",
    "a hummingbird hovering next to a pink flower, frozen wings",
    "a golden retriever puppy chewing a shoe on a wooden floor",
    "a herd of elephants crossing a dusty savanna road",
    "a chameleon on a branch, extreme close-up of its eye",
    "a snowy owl in flight against a dark pine forest",
    "koi fish swimming in a clear pond with lily pads",
    "a tabby cat stretching on a sunny windowsill",
    "a lion resting on a rock, golden hour, wildlife photography",
    "a jellyfish glowing in deep blue water",
    "penguins huddled together during a blizzard",
    # photographs: places
    "a narrow cobblestone street in an Italian village with flower boxes",
    "the northern lights over a frozen lake with a small wooden cabin",
    "a crowded night market in Taipei with neon signs and steam from food stalls",
    "an abandoned greenhouse overgrown with vines, light through broken glass",
    "terraced rice fields in the mountains after rain",
    "a modern concrete library interior with tall windows and reading desks",
    "a tropical beach with palm trees and a hammock, crystal clear water",
    "a subway platform at rush hour, long exposure",
    "a Gothic cathedral nave with stained glass light on the floor",
    "red rock canyon with a river winding through it, aerial view",
    "a cozy bookshop at night with warm lamps and a sleeping dog",
    "a windmill in a tulip field in spring",
    # objects, food, vehicles
    "a vintage typewriter on a desk with scattered papers",
    "a stack of pancakes with blueberries and dripping maple syrup",
    "a sports car drifting on a wet track, spray of water",
    "a steam locomotive crossing a stone viaduct in the mountains",
    "a glass of red wine on a marble table, soft window light",
    "an assortment of colorful macarons on a white plate, top-down view",
    "a mechanical wristwatch with its gears exposed, studio lighting",
    "a sailboat on a calm lake at dawn, reflections",
    "a ceramic teapot with a crack repaired in gold, kintsugi",
    "a vintage motorcycle parked in front of a diner",
    "fresh sushi on a wooden board with wasabi and ginger",
    "a hot air balloon festival over green hills",
    "a pile of autumn leaves with a pair of rubber boots",
    "a bicycle leaning against a brick wall covered in ivy",
    # paintings and drawings
    "an oil painting of a stormy sea with a small ship, in the style of romanticism",
    "a watercolor of a Parisian cafe on a rainy afternoon",
    "an impressionist painting of a garden with a pond and a bridge",
    "a Japanese ukiyo-e woodblock print of a wave and Mount Fuji",
    "a charcoal sketch of an old man's face",
    "a pencil drawing of a cat curled up asleep",
    "an ink wash painting of bamboo and a crane",
    "a cubist portrait of a woman playing a guitar",
    "a medieval illuminated manuscript page with a dragon in the margin",
    "a pop art portrait with bold colors and halftone dots",
    "a children's book illustration of a bear having a picnic with rabbits",
    "a fresco of angels on a cathedral ceiling",
    "an art nouveau poster of a woman surrounded by flowers",
    "a pointillist landscape of a river with boats",
    "an expressionist painting of a city street with distorted buildings",
    "a botanical illustration of a fern with labels",
    # 3-D, digital art, design
    "a low-poly 3D render of a fox in a forest",
    "an isometric illustration of a tiny island with a house and a lighthouse",
    "a claymation style scene of a snowman building a snowman",
    "a cyberpunk city street with flying cars and holographic ads, digital art",
    "a pixel art scene of a knight facing a dragon",
    "a photorealistic 3D render of a glass sphere on a checkerboard floor",
    "a flat vector illustration of a mountain landscape at sunset",
    "a minimalist logo of a bird made of a single line",
    "a vaporwave landscape with a pink sun and palm trees",
    "a steampunk airship above Victorian rooftops",
    "a cute cartoon robot watering a plant",
    "an anime girl standing on a hill under a sky full of clouds",
    "a blueprint technical drawing of a spaceship",
    "a stained glass window design of a phoenix",
    "a paper cut-out collage of an underwater reef",
    "a surreal scene of clocks melting over tree branches in a desert",
    # text in images
    "a neon sign that says OPEN above a bar door",
    "a chalkboard menu in a cafe listing coffee prices",
    "a vintage travel poster that reads VISIT THE MOON",
    "a birthday cake with the words Happy Birthday written in icing",
    "a street sign at an intersection named Maple Avenue",
    "a book cover titled The Silent Garden with an illustration of a gate",
    # abstract, patterns, science
    "an abstract painting of swirling blue and gold shapes",
    "a seamless pattern of lemons and leaves",
    "a fractal made of glowing purple spirals",
    "a microscope image of snowflake crystals",
    "a nebula with bright stars, Hubble telescope style",
    "a cross-section of a geode with amethyst crystals",
    "a topographic map with contour lines in pastel colors",
    "geometric shapes in primary colors in the style of Bauhaus",
    # medium length, several objects
    "a red cube on top of a blue sphere next to a green cylinder on a white table",
    "three cats sitting on a fence, one black, one white and one orange",
    "a kitchen table with a loaf of bread, a knife, a jar of honey and two mugs",
    "a small yellow house with a red roof beside a tall pine tree and a pond",
    "a desk with a laptop, a potted cactus, a notebook and a pair of glasses",
    "a bookshelf filled with old books, a globe and a sleeping cat on the top shelf",
    "two children flying a kite on a windy beach with a dog running beside them",
    "a fruit stand with oranges, bananas, watermelons and a handwritten price sign",
    # long
    "a detailed fantasy map of an island kingdom with mountains, rivers, a capital city, "
    "forests, a volcano in the north and sea monsters drawn in the ocean, parchment texture",
    "inside a grand library of a wizard's tower, spiral staircases, floating candles, shelves "
    "of leather-bound books reaching into darkness, an owl on a brass telescope, warm light",
    "a futuristic train station built into the side of a cliff above the sea, glass walkways, "
    "trains arriving from tunnels, people with luggage, sunset clouds, cinematic wide shot",
    "a cozy winter cabin interior with a crackling fireplace, a knitted blanket on an armchair, "
    "a steaming mug of cocoa on a side table, snow falling outside the frosted window",
    "an underwater city under a glass dome with coral gardens, schools of bright fish, "
    "submarines docking at a pier and soft rays of sunlight from the surface far above",
    "a bustling medieval market square on a festival day, banners, jugglers, merchants "
    "selling cloth and spices, a stone fountain in the middle and a castle in the distance",
    "a scientist in a white coat in a cluttered laboratory full of glowing test tubes, "
    "tangled cables, chalkboards of equations and a small robot assistant handing a wrench",
    "a quiet mountain lake at dawn, mist drifting over the water, a wooden canoe tied to a "
    "dock, pine trees reflected perfectly, the first pink light touching the snowy peaks",
    "an astronaut sitting on the edge of a crater on the moon looking at the earth rising, "
    "footprints in the grey dust, a flag and a lunar rover behind, photorealistic",
    "a rainy cyberpunk alley at night, puddles reflecting magenta and cyan signs, a noodle "
    "stand with steam, a person in a transparent raincoat, cables hanging overhead",
    "a vibrant coral reef seen from above with a sea turtle, clownfish in an anemone, "
    "a diver with a camera and sunlight making patterns on the sandy bottom",
    "a Victorian greenhouse full of exotic plants, orchids, giant water lilies in a pool, "
    "iron framework painted white, a gardener on a ladder pruning a palm tree",
    "a herd of wild horses galloping through a shallow river in the evening, water splashing, "
    "dust in the golden light, mountains in the background, epic landscape photography",
    "a child's bedroom at night lit by a starry projector lamp, toys on the floor, a "
    "dinosaur plush on the bed, a rocket poster on the wall, window showing a full moon",
    "a still life in the style of the Dutch masters: a silver goblet, peeled lemons, grapes, "
    "a dead pheasant and a half-eaten pie on a dark table with a white cloth",
    "an aerial photograph of a patchwork of farmland in autumn, fields of yellow, brown and "
    "green divided by hedgerows, a winding country road with a single red car",
    # other languages and odd phrasings
    "un chat noir sur un toit de Paris au clair de lune",
    "ein roter Leuchtturm an einer felsigen Küste im Sturm",
    "un mercado de frutas en Oaxaca lleno de colores",
    "photo, ultra detailed, 8k, of a dew drop on a spider web at sunrise",
    "minimalism. one tree. white background.",
    "What would a city on Mars look like in the year 3000?",
    "the feeling of nostalgia, painted",
    "a dog, but it is made entirely of clouds",
)


MAX_PROMPTS_BYTES = 64 << 20


def load_prompts(path=None, samples: int | None = None) -> list[str]:
    """The shipped set, or one prompt per line of ``path``; ``samples`` of them, evenly spaced."""
    if path is None:
        prompts = list(PROMPTS)
    else:
        p = Path(path)
        if not p.is_file():
            raise BitDanceError(f"prompt file {p} does not exist; give one prompt per line")
        if p.stat().st_size > MAX_PROMPTS_BYTES:
            raise BitDanceError(f"prompt file {p} is {p.stat().st_size} bytes long, more than "
                                f"the {MAX_PROMPTS_BYTES} a prompt file can be; give a shorter "
                                "one (one prompt per line)")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise BitDanceError(f"prompt file {p} is not UTF-8 text") from None
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise BitDanceError(f"prompt file {p} holds no prompts (one per line; lines "
                                "starting with # are comments)")
    if samples is not None:
        if samples < 1:
            raise BitDanceError(f"--samples must be at least 1, got {samples}")
        if samples > len(prompts):
            raise BitDanceError(f"--samples {samples} is more than the {len(prompts)} prompts "
                                "available; lower it or give a longer --prompts file")
        # evenly spaced over the set, which is grouped by kind: a small sample still mixes them
        prompts = [prompts[i * len(prompts) // samples] for i in range(samples)]
    return prompts


def prompts_hash(prompts: list[str]) -> str:
    """A hash of the prompts used (in order), recorded in a calibration file."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
