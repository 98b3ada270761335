"""What the realistic noise modes of ``inject-noise`` know about captions (docs/design.md section 9.1).

Three documented vocabularies name the facts a caption can state: colours (in
families of synonyms), counts (number words and digits 2-12) and object nouns
(in groups of synonyms, within categories), plus three pairs of position words.
``partial_edit`` changes one such word; ``caption_facts`` and ``fact_tokens``
let ``hard`` tell a near miss (other facts) from a rewording (the same facts);
``boilerplate_caption`` draws alt-text that describes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

# Colour families: a word is replaced only by the name of another family, never by a synonym
# of its own (crimson for red changes no fact). The generators' synonyms are included.
COLOUR_FAMILIES: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "maroon"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "gold", "lemon"),
    "green": ("green", "emerald", "grass-green", "olive", "lime"),
    "blue": ("blue", "navy", "azure", "turquoise"),
    "purple": ("purple", "violet", "lilac", "lavender"),
    "pink": ("pink", "magenta"),
    "brown": ("brown", "beige", "tan"),
    "black": ("black",),
    "white": ("white",),
    "gray": ("gray", "grey", "silver"),
}

# Counts of two or more only: changing "one" or "a" would also need the noun's number changed,
# and a partial edit changes exactly one word.
NUMBER_WORDS = {
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
DIGIT_COUNTS = range(2, 13)

# Object nouns by category; each entry is a group of synonyms as (singular, plural) pairs, the
# first being the group's name. A noun is replaced by the first noun of another group of the same
# category (a dog by a cat, a circle by a square), so the edited caption stays plausible.
OBJECT_CATEGORIES: dict[str, tuple[tuple[tuple[str, str], ...], ...]] = {
    "person": (
        (("man", "men"),),
        (("woman", "women"), ("lady", "ladies")),
        (("boy", "boys"),),
        (("girl", "girls"),),
        (("child", "children"), ("kid", "kids")),
        (("baby", "babies"),),
    ),
    "animal": (
        (("dog", "dogs"), ("puppy", "puppies")),
        (("cat", "cats"), ("kitten", "kittens")),
        (("horse", "horses"),),
        (("cow", "cows"),),
        (("bird", "birds"),),
        (("duck", "ducks"),),
        (("elephant", "elephants"),),
        (("bear", "bears"),),
        (("zebra", "zebras"),),
        (("giraffe", "giraffes"),),
        (("lion", "lions"),),
        (("monkey", "monkeys"),),
    ),
    "vehicle": (
        (("car", "cars"),),
        (("bus", "buses"),),
        (("truck", "trucks"),),
        (("bicycle", "bicycles"), ("bike", "bikes")),
        (("motorcycle", "motorcycles"),),
        (("train", "trains"),),
        (("boat", "boats"),),
        (("airplane", "airplanes"), ("plane", "planes"), ("aeroplane", "aeroplanes")),
    ),
    "furniture": (
        (("chair", "chairs"),),
        (("table", "tables"),),
        (("bed", "beds"),),
        (("sofa", "sofas"), ("couch", "couches")),
        (("bench", "benches"),),
        (("desk", "desks"),),
        (("door", "doors"),),
        (("window", "windows"),),
    ),
    "food": (
        (("apple", "apples"),),
        (("banana", "bananas"),),
        (("pizza", "pizzas"),),
        (("cake", "cakes"),),
        (("sandwich", "sandwiches"),),
        (("cup", "cups"), ("mug", "mugs")),
        (("bottle", "bottles"),),
        (("bowl", "bowls"),),
        (("plate", "plates"),),
    ),
    "thing": (
        (("book", "books"),),
        (("phone", "phones"),),
        (("laptop", "laptops"), ("computer", "computers")),
        (("clock", "clocks"),),
        (("umbrella", "umbrellas"),),
        (("ball", "balls"),),
        (("hat", "hats"),),
        (("shoe", "shoes"),),
        (("bag", "bags"),),
        (("kite", "kites"),),
        (("guitar", "guitars"),),
        (("lamp", "lamps"),),
        (("vase", "vases"),),
        (("flower", "flowers"),),
        (("tree", "trees"),),
    ),
    "place": (
        (("house", "houses"),),
        (("building", "buildings"),),
        (("beach", "beaches"),),
        (("mountain", "mountains"),),
        (("river", "rivers"),),
        (("lake", "lakes"),),
        (("street", "streets"), ("road", "roads")),
    ),
    # The shapes of ncleaner's generators, with the synonyms the paraphrase generator uses.
    "shape": (
        (("circle", "circles"), ("disc", "discs"), ("round", "round")),
        (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
        (("triangle", "triangles"), ("three-sided", "three-sided"), ("triangular", "triangular")),
        (("cross", "crosses"), ("plus", "plus")),
        (("star", "stars"),),
        (("heart", "hearts"),),
        (("rectangle", "rectangles"),),
    ),
}

# Position words swapped with their opposite ("to the left of" -> "to the right of").
POSITION_SWAPS = {
    "left": "right",
    "right": "left",
    "above": "below",
    "below": "above",
    "top": "bottom",
    "bottom": "top",
}

# Alt-text that describes nothing: what crawled pools are full of. Half of the boilerplate
# captions are phrases, half camera and CMS file names with seeded numbers.
BOILERPLATE_PHRASES = (
    "click to enlarge",
    "click here to enlarge",
    "stock photo",
    "stock image",
    "royalty free stock photo",
    "image",
    "photo",
    "picture",
    "untitled",
    "thumbnail",
    "no description available",
    "image not found",
    "placeholder image",
    "free shipping on orders over $50",
    "add to cart",
    "buy now",
    "shop now",
    "sale! 50% off",
    "in stock, ships today",
    "view larger image",
    "see more photos",
    "product image",
    "main product photo",
    "customer photo",
    "share on facebook",
    "pin it",
    "follow us on instagram",
    "all rights reserved",
    "copyright 2019",
    "loading...",
    "logo",
    "banner",
    "header image",
    "featured image",
    "download high resolution",
    "new arrival",
    "best seller",
    "limited time offer",
    "read more",
    "gallery image 3 of 12",
)
FILE_NAME_TEMPLATES = (
    "IMG_{:04d}.JPG",
    "IMG_{:04d}.jpg",
    "DSC{:05d}.JPG",
    "DSC_{:04d}.jpg",
    "PXL_2023{:04d}.jpg",
    "image-{}.png",
    "photo ({}).jpg",
    "Screenshot_{:04d}.png",
    "{:06d}.jpg",
    "thumbnail_{}.webp",
)

_WORD = re.compile(r"\w+(?:['-]\w+)*")


@dataclass(frozen=True)
class _Word:
    kind: str  # colour, count, noun, position
    canonical: str  # family / value / group name / the word
    plural: bool = False
    category: str = ""


def _build_lexicon() -> tuple[dict[str, _Word], dict[str, list[tuple[str, str]]]]:
    lexicon: dict[str, _Word] = {}
    for family, words in COLOUR_FAMILIES.items():
        for w in words:
            lexicon[w] = _Word("colour", family)
    for w, v in NUMBER_WORDS.items():
        lexicon[w] = _Word("count", str(v))
    for v in DIGIT_COUNTS:
        lexicon[str(v)] = _Word("count", str(v))
    group_heads: dict[str, list[tuple[str, str]]] = {}
    for category, groups in OBJECT_CATEGORIES.items():
        group_heads[category] = [group[0] for group in groups]
        for group in groups:
            name = group[0][0]
            for singular, plural in group:
                lexicon.setdefault(plural, _Word("noun", name, plural=True, category=category))
                lexicon[singular] = _Word("noun", name, plural=False, category=category)
    for w in POSITION_SWAPS:
        lexicon[w] = _Word("position", w)
    return lexicon, group_heads


_LEXICON, _GROUP_HEADS = _build_lexicon()


def _article_fits(article: str | None, word: str) -> bool:
    """Whether ``word`` may follow the article that precedes the edited word (a red / an orange)."""
    if article is None:
        return True
    return (word[0] in "aeiou") == (article == "an")


def _match_case(original: str, word: str) -> str:
    if original.isupper() and len(original) > 1:
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _vocabulary_parts() -> dict[str, int]:
    """Each replacement word's position in one fixed order of the facts (colour families, counts,
    object groups, position words; a noun's plural shares its singular's): ``position % parts``
    splits the replacements into disjoint vocabularies that never share a fact."""
    order: dict[str, int] = {}
    for w in [*COLOUR_FAMILIES, *NUMBER_WORDS, *(str(v) for v in DIGIT_COUNTS)]:
        order[w] = len(order)
    for groups in OBJECT_CATEGORIES.values():
        for singular, plural in (g[0] for g in groups):
            order[singular] = order[plural] = len(set(order.values()))
    for w in POSITION_SWAPS:
        order[w] = len(set(order.values()))
    return order


_VOCABULARY_ORDER = _vocabulary_parts()


def _replacements(token: str, previous: str | None, vocabulary: tuple[int, int] | None = None) -> list[str]:
    """Words that change the fact ``token`` states, in a fixed order (empty: not editable).

    With ``vocabulary=(part, parts)`` only the replacements of that one of ``parts`` disjoint
    vocabularies are offered (a count of 2 and the word "cat" are in one part, "3" and "dog" in another).
    """
    entry = _LEXICON.get(token.lower())
    if entry is None:
        return []
    article = previous if previous in ("a", "an") else None
    if entry.kind == "colour":
        options = [f for f in COLOUR_FAMILIES if f != entry.canonical]
    elif entry.kind == "count":
        if token.isdigit():
            options = [str(v) for v in DIGIT_COUNTS if str(v) != entry.canonical]
        else:
            options = [w for w, v in NUMBER_WORDS.items() if str(v) != entry.canonical]
    elif entry.kind == "noun":
        options = [
            plural if entry.plural else singular
            for singular, plural in _GROUP_HEADS[entry.category]
            if singular != entry.canonical
        ]
    else:
        options = [POSITION_SWAPS[entry.canonical]]
    if vocabulary is not None:
        part, parts = vocabulary
        options = [w for w in options if _VOCABULARY_ORDER[w] % parts == part]
    return [_match_case(token, w) for w in options if _article_fits(article, w)]


def partial_edit(caption: str, rng: np.random.Generator, *, vocabulary: tuple[int, int] | None = None) -> str | None:
    """``caption`` with one fact word (a colour, count, object or position) replaced, or None.

    The word is drawn uniformly among the caption's editable words and its
    replacement uniformly among the words that state another fact and still fit
    the article before it. Every other character of the caption is kept.
    ``vocabulary=(part, parts)`` draws replacements from one of ``parts`` disjoint
    vocabularies only, so that the edits ``fit`` trains on and the two halves of its
    self-check never share a replacement word (``ncleaner.selfcheck``).
    """
    tokens = list(_WORD.finditer(caption))
    candidates = []
    for i, match in enumerate(tokens):
        previous = tokens[i - 1].group().lower() if i else None
        options = _replacements(match.group(), previous, vocabulary)
        if options:
            candidates.append((match, options))
    if not candidates:
        return None
    match, options = candidates[int(rng.integers(len(candidates)))]
    new = options[int(rng.integers(len(options)))]
    return caption[: match.start()] + new + caption[match.end() :]


def fact_tokens(caption: str) -> list[str]:
    """The caption's colours, counts and objects as canonical tokens (synonyms merged)."""
    out = []
    for match in _WORD.finditer(caption):
        entry = _LEXICON.get(match.group().lower())
        if entry is not None and entry.kind != "position":
            out.append(f"{entry.kind}:{entry.canonical}")
    return out


def caption_facts(caption: str) -> tuple:
    """What a caption states, as a sorted tuple of (count, colours, object) phrases.

    A noun takes the count and colours written before it since the previous
    noun; a plural noun without a count counts as "many". Position words are
    left out on purpose: "A left of B" and "B right of A" say the same, and word
    sets cannot tell them from "B left of A". Two captions with the same facts are
    rewordings of one another, never a near miss.
    """
    phrases = []
    count, colours = "", []
    for match in _WORD.finditer(caption):
        entry = _LEXICON.get(match.group().lower())
        if entry is None or entry.kind == "position":
            continue
        if entry.kind == "colour":
            colours.append(entry.canonical)
        elif entry.kind == "count":
            count = entry.canonical
        else:
            phrases.append((count or ("many" if entry.plural else "1"), tuple(sorted(colours)), entry.canonical))
            count, colours = "", []
    if count or colours:
        phrases.append((count, tuple(sorted(colours)), ""))
    return tuple(sorted(phrases))


def normalise(caption: str) -> str:
    """Lower case, words only: two captions equal under it are the same caption."""
    return " ".join(m.group() for m in _WORD.finditer(caption.lower()))


def boilerplate_caption(rng: np.random.Generator) -> str:
    """One seeded piece of alt-text that describes nothing: a phrase or a file name, half and half."""
    if rng.random() < 0.5:
        return BOILERPLATE_PHRASES[int(rng.integers(len(BOILERPLATE_PHRASES)))]
    template = FILE_NAME_TEMPLATES[int(rng.integers(len(FILE_NAME_TEMPLATES)))]
    return template.format(int(rng.integers(1, 10000)))


def is_boilerplate(caption: str) -> bool:
    """Whether ``caption`` is one that ``boilerplate_caption`` can draw."""
    if caption in BOILERPLATE_PHRASES:
        return True
    for template in FILE_NAME_TEMPLATES:
        pattern = re.escape(template).replace(re.escape("{:04d}"), r"\d{4}")
        pattern = pattern.replace(re.escape("{:05d}"), r"\d{5}").replace(re.escape("{:06d}"), r"\d{6}")
        if re.fullmatch(pattern.replace(re.escape("{}"), r"\d+"), caption):
            return True
    return False
