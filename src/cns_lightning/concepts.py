"""A personal concept: a folder of images, their captions, a modifier token and a class noun.

Captions may hold the placeholder ``{token}`` where the modifier token goes (e.g.
``"a {token} dog on the beach"``). A caption without it gets the token bound to the class noun:
the first whole-word occurrence of the class noun becomes ``"{token} <class>"``; if the class noun
does not occur, ``"{token} <class>, "`` is put in front. Without caption files every image gets
``caption_template`` (default ``"photo of a {token} {class}"``).

A concept comes from a folder (``path``) or from the micro world (``source: microworld``, which
renders the concept's images deterministically into a cache folder).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = ("live_subject", "object", "style", "scene")

# Default evaluation prompts per category; {token} and {class} are filled in. The object and
# live-subject lists follow DreamBooth's prompts (google/dreambooth, CC-BY-4.0).
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "object": [
        "a {token} {class} in the jungle",
        "a {token} {class} in the snow",
        "a {token} {class} on the beach",
        "a {token} {class} on a cobblestone street",
        "a {token} {class} on top of pink fabric",
        "a {token} {class} with a city in the background",
        "a red {token} {class}",
        "a {token} {class} floating on top of water",
    ],
    "live_subject": [
        "a {token} {class} in the jungle",
        "a {token} {class} in the snow",
        "a {token} {class} on the beach",
        "a {token} {class} wearing a red hat",
        "a {token} {class} in a chef outfit",
        "a {token} {class} with a city in the background",
        "a {token} {class} sleeping",
        "a {token} {class} in a purple wizard outfit",
    ],
    "style": [
        "a painting of a dog in {token} {class}",
        "a painting of a mountain village in {token} {class}",
        "a portrait of a woman in {token} {class}",
        "a bowl of fruit in {token} {class}",
    ],
    "scene": [
        "a dog in front of the {token} {class}",
        "the {token} {class} at night",
        "the {token} {class} in the snow",
        "a car parked next to the {token} {class}",
    ],
}


class ConceptError(ValueError):
    """A concept entry of the config is wrong; the message names the field and the fix."""


@dataclass
class Concept:
    name: str
    token: str
    class_name: str
    category: str = "object"
    path: Path | None = None
    source: str = "folder"  # "folder" or "microworld"
    caption_template: str = "photo of a {token} {class}"
    prompts: list[str] | None = None
    init_word: str | None = None  # word whose embedding initialises the token; default: class noun
    prior_prompt: str | None = None  # prior-preservation prompt; default: caption_template without token
    extra: dict[str, Any] = field(default_factory=dict)
    token_given: bool = True  # False: ``token`` is the default <new{i}>, renumbered past a base model's own tokens

    # ------------------------------------------------------------------ files
    def folder(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """The concept's image folder (rendered first for micro-world concepts)."""
        if self.source == "microworld":
            from .microworld.concepts import materialize

            root = Path(cache_dir or os.environ.get("CNS_CACHE", Path.home() / ".cache" / "cns_lightning")) / "microworld"
            return materialize(self.name, root)
        if self.path is None:
            raise ConceptError(f"concept {self.name!r}: no `path` given; set data.concepts[i].path to a folder of images")
        return Path(os.path.expanduser(str(self.path)))

    def image_paths(self, cache_dir=None) -> list[Path]:
        from .images import list_images

        return list_images(self.folder(cache_dir))

    def captions(self, cache_dir=None) -> list[str]:
        """One caption per image, with the modifier token written in."""
        from .images import read_captions

        folder = self.folder(cache_dir)
        images = self.image_paths(cache_dir)
        raw = read_captions(folder, images) or [self.caption_template] * len(images)
        return [self.fill(bind_token(c, self.class_name)) for c in raw]

    # ---------------------------------------------------------------- prompts
    def fill(self, template: str, with_token: bool = True) -> str:
        """Fill ``{token}``/``{class}``; ``with_token=False`` drops the token (CLIP-T's prompt)."""
        text = template.replace("{class}", self.class_name)
        text = text.replace("{token}", self.token if with_token else "")
        return re.sub(r"\s+", " ", text).strip()

    def eval_prompts(self) -> list[str]:
        """Evaluation prompt templates ({token}/{class} placeholders) for this concept."""
        if self.prompts:
            return list(self.prompts)
        return list(DEFAULT_PROMPTS[self.category])

    def class_prompt(self) -> str:
        """Prior-preservation prompt (Eq. 8): ``prior_prompt``, else the caption template without token."""
        return self.fill(self.prior_prompt or self.caption_template, with_token=False)


def bind_token(caption: str, class_name: str) -> str:
    """Make sure ``caption`` holds ``{token}``: bind it to the class noun or put it in front."""
    if "{token}" in caption:
        return caption
    pattern = re.compile(rf"\b{re.escape(class_name)}\b", re.IGNORECASE)
    if pattern.search(caption):
        return pattern.sub(lambda m: "{token} " + m.group(0), caption, count=1)
    return "{token} " + class_name + ", " + caption


def _microworld_defaults(d: dict, where: str) -> dict:
    """Fill class, category, prompts and prior prompt of a micro-world concept from its definition."""
    from .microworld.concepts import CONCEPTS

    if d.get("name") not in CONCEPTS:
        raise ConceptError(f"{where}.name={d.get('name')!r} is not a micro-world concept; choose one of {', '.join(CONCEPTS)}")
    mc = CONCEPTS[d["name"]]
    d.setdefault("class_name", mc.class_name)
    d.setdefault("category", mc.category)
    d.setdefault("prompts", list(mc.eval_prompts))
    d.setdefault("prior_prompt", mc.captions()[0])
    return d


ENTRY_KEYS = tuple(f for f in Concept.__dataclass_fields__ if f not in ("extra", "token_given"))  # the keys of a data.concepts entry


def concept_from_config(entry: Any, index: int) -> Concept:
    """Build a Concept from one ``data.concepts`` entry (a dict-like from Hydra); an unknown key
    (a typo such as ``tokn``) is an error naming it and the valid keys."""
    where = f"data.concepts[{index}]"
    if not hasattr(entry, "items"):
        raise ConceptError(f"{where}={entry!r} is not a concept entry; each entry is a mapping such as {{name: teddy, class_name: 'teddy bear', path: /abs/folder}}")
    d = {str(k): v for k, v in dict(entry).items() if v is not None}
    for key in d:
        if key not in ENTRY_KEYS:
            near = difflib.get_close_matches(key, ENTRY_KEYS, n=1)
            raise ConceptError(
                f"{where}.{key} is not a concept key{f' (did you mean {near[0]}?)' if near else ''}; "
                f"the keys of a concept entry are {', '.join(ENTRY_KEYS)}. Fix the entry in data.concepts (the experiment YAML or the override)."
            )
    if d.get("source") == "microworld":
        d = _microworld_defaults(d, where)
    for key in ("name", "class_name"):
        if not d.get(key):
            raise ConceptError(f"{where}: missing `{key}`; every concept needs a name and a class noun (e.g. class_name: dog)")
    if "token" not in d:
        d["token"], d["token_given"] = f"<new{index + 1}>", False
    category = d.get("category", "object")
    if category not in CATEGORIES:
        raise ConceptError(f"{where}.category={category!r}: choose one of {', '.join(CATEGORIES)}")
    source = d.get("source", "folder")
    if source not in ("folder", "microworld"):
        raise ConceptError(f"{where}.source={source!r}: choose 'folder' (with path: ...) or 'microworld'")
    if source == "folder" and not d.get("path"):
        raise ConceptError(f"{where} ({d['name']}): set `path` to a folder of images, or `source: microworld`")
    kwargs = dict(d)
    if kwargs.get("path") is not None:
        kwargs["path"] = Path(str(kwargs["path"]))
    if kwargs.get("prompts") is not None:
        kwargs["prompts"] = [str(p) for p in kwargs["prompts"]]
    return Concept(**kwargs)


def concepts_from_config(entries: Any) -> list[Concept]:
    """All concepts of a sequence, checking that tokens and names are unique."""
    if isinstance(entries, (str, bytes)) or (entries is not None and not hasattr(entries, "__len__")):
        raise ConceptError(
            f"data.concepts={entries!r} is not a list of concepts. Give a list of entries, e.g. "
            "data.concepts=[{name:teddy,class_name:'teddy bear',path:/abs/folder}], or an experiment that sets it "
            "(+experiment=seq7); a folder of images is one entry's path."
        )
    if hasattr(entries, "items"):
        raise ConceptError("data.concepts is a mapping, not a list; write it as a list of entries (- {name: ..., class_name: ..., path: ...})")
    if not entries:
        raise ConceptError("data.concepts is empty: list at least one concept (see src/cns_lightning/conf/experiment/seq7.yaml)")
    concepts = [concept_from_config(e, i) for i, e in enumerate(entries)]
    for attr in ("name", "token"):
        seen: dict[str, int] = {}
        for i, c in enumerate(concepts):
            v = getattr(c, attr)
            if v in seen:
                raise ConceptError(
                    f"data.concepts[{i}].{attr}={v!r} is used twice (also data.concepts[{seen[v]}]); "
                    f"give every concept its own {attr}"
                )
            seen[v] = i
    return concepts
