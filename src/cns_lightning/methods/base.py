"""The interface every method of the continual loop implements (one file per method beside it).

A method's life in a run (``continual.run`` calls these in this order; ``restore.load_run`` calls
``setup`` then ``load``):

* ``check_model(pipe, concepts)``: once, on the base model before the loop writes anything but the
  run folder's config (knobs that must fit the model, e.g. an orthogonal basis);
* ``setup(ctx)``: once, on the base model with every concept's token added (e.g. W_0, norms);
* ``begin_stage(ctx, m, concept)``: what trains in stage m: a :class:`~.stage.TrainingStage` that
  the LightningModule drives (optimizer groups and learning rates, extra loss terms such as L_reg,
  hooks after the backward); it starts from the current model, unless the method resets the live
  weights to the base model there (methods that train each concept alone, then fuse);
* ``end_stage(ctx, m, concept)``: what the stage keeps, as named safetensors and JSON files
  (:class:`StageFiles`); the loop writes them, with ``stage.json`` and the manifest;
* ``merge(ctx, m)``: an optional fusion step after ``end_stage`` (the loop measures its wall time and
  extra peak CPU / GPU memory, ``fusion_cost``, into ``stage.json`` and ``summary.json``); it leaves
  the live model holding concepts 1..m; a no-op for methods whose one model already holds them;
* ``load(ctx, stages)``: rebuild the live model from the saved stages 1..n (resume, ``restore``,
  ``generate``, ``export``): the model the loop had after stage n's merge.

Knobs: each method declares its own (:class:`Knob`, relative to ``method.``); the knobs every
method shares (``SHARED_KNOBS``: steps, token lr, prior weight) are declared here and live in
``src/cns_lightning/conf/method/common/shared.yaml``. The declarations drive the config checks (``preflight``) and the
run's identity (``run_folder``): which knobs may change on resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..concepts import Concept
from ..knobs import Knob

# Version of the stage-folder layout this code writes (recorded in each stage.json as "format";
# folders of the release before ``methods/`` have none: format 0).
FORMAT_VERSION = 1
TOKEN_FILE = "token.safetensors"  # a concept's token embedding row (every method here keeps it)



SHARED_KNOBS: tuple[Knob, ...] = (
    Knob("steps", "int", 1, resumable=True, example="500"),
    Knob("lr_token", "float", 0.0, resumable=True),
    Knob("prior_weight", "float", 0.0, resumable=True),
)


@dataclass
class RunContext:
    """What a method sees of the run: the pipeline, the concepts and their token ids, and the
    settings of the run that are not the method's own (seed, caches, learning-rate scales)."""

    pipe: Any
    concepts: list[Concept]
    token_ids: dict[str, int]
    seed: int = 0
    cache_dir: str | None = None
    calibration_prompts: list[str] = field(default_factory=list)
    kv_lr_scale: float = 1.0
    token_lr_scale: float = 1.0

    @property
    def embeddings(self) -> torch.nn.Parameter:
        return self.pipe.text_encoder.get_input_embeddings().weight


@dataclass
class StageFiles:
    """What a stage keeps: safetensors files (name -> (tensors, metadata)), JSON files, and entries
    for the stage's ``stage.json`` (e.g. how many weights the concept owns)."""

    tensors: dict[str, tuple[dict[str, torch.Tensor], dict[str, str]]]
    json: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SavedStage:
    """A completed stage folder as read back (hashes verified): its files and ``stage.json``."""

    folder: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, dict[str, str]]
    json: dict[str, Any]

    @property
    def info(self) -> dict:
        return self.json.get("stage.json", {})

    @property
    def format(self) -> int:
        return int(self.info.get("format", 0))


def stage_key(index: int) -> str:
    """How stage ``index`` (0-based) is named in messages: c01, c02, ..."""
    return f"c{index + 1:02d}"


class ModelFitError(ValueError):
    """A method knob that does not fit the run's model or sequence; the message names the key and the fix."""


class StageFormatError(ValueError):
    """A stage folder that this method cannot load; the message names the folder and the fix."""


class Method(ABC):
    """One method of the continual loop (see the module docstring for the life of a method)."""

    name: str
    knobs: ClassVar[tuple[Knob, ...]] = ()  # the method's own knobs, relative to ``method.``

    def __init__(self, name: str, steps: int = 500, lr_token: float = 5e-4, prior_weight: float = 1.0):
        self.name = str(name)
        self.steps = int(steps)
        self.lr_token = float(lr_token)
        self.prior_weight = float(prior_weight)

    @classmethod
    def target(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    def declared_knobs(cls) -> tuple[Knob, ...]:
        """Every knob of ``method.`` this method reads (shared first), keys relative to ``method.``."""
        return SHARED_KNOBS + cls.knobs

    def check_model(self, pipe, concepts: list[Concept]) -> None:  # noqa: B027 - optional hook
        """Before anything of the run's stages is written, on the base model: raise
        :class:`ModelFitError` (naming the knob and the fix) if the method cannot train ``concepts``
        on this model (e.g. an orthogonal basis too small for the sequence)."""

    def setup(self, ctx: RunContext) -> None:  # noqa: B027 - optional hook
        """Before stage 1 (and before ``load``), on the base model with every concept's token added."""

    @abstractmethod
    def begin_stage(self, ctx: RunContext, m: int, concept: Concept):
        """What trains in stage ``m`` (0-based): a ``TrainingStage`` for the LightningModule."""

    @abstractmethod
    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        """After a completed fit: what stage ``m`` keeps (may round the live weights to match it)."""

    def merge(self, ctx: RunContext, m: int) -> None:  # noqa: B027 - optional hook
        """A fusion step after stage ``m`` (none by default: one model already holds every concept)."""

    @abstractmethod
    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        """Rebuild the live model after stages 1..len(stages) from their saved folders."""

    def check_writer(self, stage: SavedStage) -> None:
        """Raise :class:`StageFormatError` unless ``stage`` is a folder this method can load: written
        by this method (folders before ``methods/`` record none) in a layout no newer than this code's."""
        written_by = stage.info.get("method_target")
        if written_by is not None and written_by != self.target():
            raise StageFormatError(
                f"{stage.folder}: written by method {written_by} but the run's config names {self.target()}. "
                "The folder and the config are from different runs; use the run folder as the run wrote it."
            )
        if stage.format > FORMAT_VERSION:
            raise StageFormatError(f"{stage.folder}: stage format {stage.format} is newer than this code reads ({FORMAT_VERSION}). Update cns_lightning to use it.")

    def live_tensors(self, ctx: RunContext) -> list[torch.Tensor]:
        """The tensors this method's stages change (every DDP rank must end a stage with the same)."""
        from ..models import cross_attention_kv

        return [*cross_attention_kv(ctx.pipe.unet).values(), ctx.embeddings[list(ctx.token_ids.values())]]

    def token_file(self, ctx: RunContext, concept: Concept) -> tuple[dict[str, torch.Tensor], None]:
        """(tensors, metadata) of ``token.safetensors``: the concept's token row, fp32."""
        return {"embedding": ctx.embeddings[ctx.token_ids[concept.name]].detach().float().cpu()}, None

    def set_token_rows(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        """Write each saved stage's ``token.safetensors`` row into the text encoder's embeddings."""
        emb = ctx.embeddings
        for s, concept in zip(stages, ctx.concepts):
            if TOKEN_FILE not in s.tensors:
                raise StageFormatError(f"{s.folder}: has no {TOKEN_FILE}. Delete that stage folder and rerun the run to redo it.")
            row = s.tensors[TOKEN_FILE]["embedding"].reshape(-1)
            if row.numel() != emb.shape[1]:
                raise StageFormatError(
                    f"{s.folder}/{TOKEN_FILE}: {row.numel()} values but the text encoder's embeddings have {emb.shape[1]}. "
                    "Restore with the run's original model."
                )
            with torch.no_grad():
                emb[ctx.token_ids[concept.name]] = row.to(emb.device, emb.dtype)
