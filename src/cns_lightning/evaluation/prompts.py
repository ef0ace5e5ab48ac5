"""Evaluation prompts: single-concept (from ``Concept.eval_prompts()``), zero-shot, multi-concept.

Every evaluated prompt has two texts: the *generation* prompt (with modifier tokens, given to the
diffusion pipeline) and the *CLIP-T* prompt (the same without modifier tokens, given to CLIP), as
in Custom Diffusion's evaluation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..concepts import Concept

PROMPT_DIR = Path(__file__).parent / "prompts"

# Multi-concept templates: {a} / {b} become "<token> <class>" (generation) or "<class>" (CLIP-T).
DEFAULT_MULTI_PROMPTS: list[str] = [
    "a photo of a {a} and a {b}",
    "a {a} next to a {b}",
    "a {a} and a {b} on the beach",
    "a {a} and a {b} in the snow",
]


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt to evaluate: what the pipeline sees and what CLIP-T sees."""

    generate: str  # with modifier tokens
    clip_text: str  # modifier tokens removed
    concepts: tuple[str, ...]  # names of the concepts whose references CLIP-I uses


def read_prompt_file(path: Path) -> list[str]:
    """Non-empty lines of a prompt file, '#' comment lines skipped."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def default_zero_shot_prompts() -> list[str]:
    """The shipped zero-shot prompts (12 PartiPrompts, one per category)."""
    return read_prompt_file(PROMPT_DIR / "zero_shot_parti.txt")


def _limit(items: list, n: int | None) -> list:
    return list(items) if n is None else list(items)[: int(n)]


def single_prompts(concept: Concept, max_prompts: int | None, with_token: bool = True) -> list[EvalPrompt]:
    """The concept's evaluation prompts; ``with_token=False`` generates the class prompt (base model)."""
    out = []
    for t in _limit(concept.eval_prompts(), max_prompts):
        out.append(EvalPrompt(concept.fill(t, with_token=with_token), concept.fill(t, with_token=False), (concept.name,)))
    return out


def zero_shot(prompts: list[str], max_prompts: int | None) -> list[EvalPrompt]:
    return [EvalPrompt(p, p, ()) for p in _limit(prompts, max_prompts)]


def _phrase(c: Concept, with_token: bool) -> str:
    return c.fill("{token} {class}", with_token=with_token)


def multi_prompts(a: Concept, b: Concept, templates: list[str], max_prompts: int | None) -> list[EvalPrompt]:
    """Prompts naming two concepts; templates hold ``{a}`` and ``{b}``."""
    out = []
    for t in _limit(templates, max_prompts):
        if "{a}" not in t or "{b}" not in t:
            raise ValueError(
                f"eval.multi_prompts: {t!r} must contain both {{a}} and {{b}} (each becomes '<token> <class>' of one concept)"
            )
        gen = t.replace("{a}", _phrase(a, True)).replace("{b}", _phrase(b, True))
        txt = t.replace("{a}", _phrase(a, False)).replace("{b}", _phrase(b, False))
        out.append(EvalPrompt(re.sub(r"\s+", " ", gen).strip(), re.sub(r"\s+", " ", txt).strip(), (a.name, b.name)))
    return out
