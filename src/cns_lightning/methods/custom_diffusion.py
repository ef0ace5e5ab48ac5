"""Custom Diffusion with its closed-form merge: Kumari et al., "Multi-Concept Customization of
Text-to-Image Diffusion", CVPR 2023 (Sec. 3.2, multiple-concept compositional fine-tuning).

Per concept, every cross-attention K/V weight and the concept's modifier token train **from the
base model** (the live K/V are reset to W_0 at the start of each stage; the earlier concepts'
tokens keep their rows). A stage keeps that concept's own K/V (fp16 deltas W_i - W_0) and token.
The model after stage m is the closed-form constrained merge of concepts 1..m
(:func:`constrained_merge`, per K/V matrix): the outputs on the regularization prompts stay as close
as possible to the base model's, subject to every concept's own fine-tuned outputs on its target
prompts. ``full_kv`` is the same parameters trained one after the other without the merge.

Choices the paper leaves open, fixed here (docstrings of :func:`target_prompts`,
:func:`regularization_prompts`): which prompts, and which token positions, make C_tgt and C_reg.
The merge code is written from the paper's equations (the official merge code is under a
non-commercial license and was not used).
"""

from __future__ import annotations

import warnings

import torch

from ..concepts import Concept
from ..models import cross_attention_kv
from .base import TOKEN_FILE, Knob, Method, RunContext, SavedStage, StageFiles, StageFormatError, stage_key
from .kv_store import round_to_deltas
from .stage import MaskedStage, masked_stage

CONCEPT_KV_FILE = "concept_kv.safetensors"  # this concept's own fine-tuned K/V: W_i - W_0, every entry
TARGET_TEMPLATES = ("{token} {class}", "photo of a {token} {class}")  # Custom Diffusion's examples of target prompts
# Which positions of a target prompt are C_tgt rows: from the token through the end token, or the token's alone.
TARGET_POSITIONS = ("token_to_eos", "token")


# ----------------------------------------------------------------------------- the merge (equations)
def merge_operator(c_tgt: torch.Tensor, c_reg: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The part of Custom Diffusion's closed-form merge that is the same for every K/V matrix:
    P = (d C_tgt^T)^+ d with d = C_tgt (C_reg^T C_reg)^-1, so that W = W_0 + (V_tgt - W_0 C_tgt^T) P
    (Kumari et al., CVPR 2023, Sec. 3.2; :func:`constrained_merge`).

    ``c_tgt`` (n x d): target text features (rows), ``c_reg`` (r x d): regularization text features.
    ``ridge`` adds ``ridge * mean(diag(C_reg^T C_reg))`` to the diagonal of C_reg^T C_reg (0: the
    paper's exact problem; a guard for a rank-deficient C_reg). ``^+`` is the pseudo-inverse: when
    the target rows are independent it is the inverse and the constraint holds exactly; otherwise
    the targets are met in least squares. Returns P (n x d), float64.
    """
    c_tgt, c_reg = c_tgt.double(), c_reg.double()
    gram = c_reg.T @ c_reg
    if ridge > 0:
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    d = torch.linalg.solve(gram, c_tgt.T).T  # C_tgt (C_reg^T C_reg)^-1 (the Gram matrix is symmetric)
    return torch.linalg.pinv(d @ c_tgt.T, hermitian=True) @ d


def constrained_merge(w0: torch.Tensor, v_tgt: torch.Tensor, c_tgt: torch.Tensor, c_reg: torch.Tensor, ridge: float = 0.0,
                      operator: torch.Tensor | None = None) -> torch.Tensor:
    """Custom Diffusion's merge of one K/V matrix (Kumari et al., CVPR 2023, Sec. 3.2):

        W = argmin_W || (W - W_0) C_reg^T ||_F   subject to   W C_tgt^T = V_tgt,

    closed form W = W_0 + (V_tgt - W_0 C_tgt^T) (d C_tgt^T)^-1 d, d = C_tgt (C_reg^T C_reg)^-1.
    ``w0`` (out x d), ``v_tgt`` (out x n): each concept's fine-tuned W_i applied to its own target
    features, ``c_tgt`` (n x d), ``c_reg`` (r x d); ``operator``: :func:`merge_operator` of
    (c_tgt, c_reg, ridge), computed once for every matrix of a model. Returns W in float64.
    """
    p = merge_operator(c_tgt, c_reg, ridge) if operator is None else operator
    w0 = w0.double()
    return w0 + (v_tgt.double() - w0 @ c_tgt.double().T) @ p


# ----------------------------------------------------------------------------- its text features
def target_prompts(concept: Concept) -> list[str]:
    """The prompts whose outputs the merge keeps at concept's own fine-tuned values (C_tgt):
    ``TARGET_TEMPLATES`` filled with its token and class noun, as the paper's examples
    ("<new1> cat", "photo of a <new1> cat")."""
    return list(dict.fromkeys(concept.fill(t) for t in TARGET_TEMPLATES))


def regularization_prompts(ctx: RunContext, n: int) -> list[str]:
    """The prompts whose outputs the merge keeps close to the base model's (C_reg): the run's K
    calibration prompts (Eq. 5 of CNS; the paper uses ~200 captions of its regularization images)
    and the class prompts (prior preservation, no token) of concepts 1..n."""
    return list(dict.fromkeys([*ctx.calibration_prompts, *(c.class_prompt() for c in ctx.concepts[:n])]))


@torch.no_grad()
def text_features(ctx: RunContext, prompts: list[str], token_id: int | None = None, positions: str = "token_to_eos") -> torch.Tensor:
    """Rows of text-encoder hidden states (what cross-attention K/V read). With ``token_id``: with
    ``positions="token_to_eos"`` the positions from that token through the end token of each prompt
    (the positions that see the token in a causal text encoder; the others equal those of the
    prompt without it), with ``"token"`` the token's own position; without: all 77 positions."""
    tok, te = ctx.pipe.tokenizer, ctx.pipe.text_encoder
    device = next(te.parameters()).device
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = te(ids.to(device))[0].float()
    if token_id is None:
        return hidden.reshape(-1, hidden.shape[-1])
    rows = []
    for i, row in enumerate(ids.tolist()):
        start = row.index(token_id)
        end = row.index(tok.eos_token_id, start) if tok.eos_token_id in row[start:] else len(row) - 1
        end = start if positions == "token" else end
        rows.append(hidden[i, start : end + 1])
    return torch.cat(rows)


class CustomDiffusion(Method):
    knobs = (
        Knob("lr_neurons", "float", 0.0, resumable=True),
        Knob("ridge", "float", 0.0, example="1e-5"),
        Knob("target_positions", "choice", choices=TARGET_POSITIONS),
    )

    def __init__(self, name: str = "custom_diffusion", lr_neurons: float = 2e-5, ridge: float = 1e-5, target_positions: str = "token_to_eos",
                 **shared):
        super().__init__(name, **shared)
        self.target_positions = str(target_positions)
        self.lr_neurons = float(lr_neurons)
        self.ridge = float(ridge)
        self.deltas: list[dict[str, torch.Tensor]] = []  # W_i - W_0 of concepts 1..m (CPU, as saved)

    # ----------------------------------------------------------------- life of a run
    def setup(self, ctx: RunContext) -> None:
        """W_0: the base model's K/V (every concept trains from it, the merge stays near it). With
        ``ridge=0``, first check that C_reg^T C_reg can be inverted (before any stage trains)."""
        self.initial = {n: p.detach().clone() for n, p in cross_attention_kv(ctx.pipe.unet).items()}
        self.deltas = []
        if self.ridge == 0 and ctx.concepts:
            self.check_regularization(ctx)

    def check_regularization(self, ctx: RunContext) -> None:
        """Raise ``ConfigValueError`` (naming ``method.ridge``) when the regularization features of
        the first stage leave C_reg^T C_reg singular in float64 (condition number above 1e12; the
        tiny test model's are)."""
        from ..preflight import ConfigValueError

        c_reg = text_features(ctx, regularization_prompts(ctx, 1)).double()
        eig = torch.linalg.eigvalsh(c_reg.T @ c_reg)
        if float(eig[0]) <= 1e-12 * float(eig[-1]):
            raise ConfigValueError(
                f"method.ridge=0: the regularization prompts' text features ({c_reg.shape[0]} rows of width {c_reg.shape[1]}) "
                f"leave C_reg^T C_reg singular (eigenvalues {float(eig[0]):.3g} .. {float(eig[-1]):.3g}), so Custom Diffusion's merge "
                "has no unique solution. Fix: method.ridge=1e-5 (the default), or more and more varied calibration prompts."
            )

    def begin_stage(self, ctx: RunContext, m: int, concept: Concept) -> MaskedStage:
        """Reset the live K/V to W_0, then train every K/V entry and the concept's token."""
        kv = cross_attention_kv(ctx.pipe.unet)
        with torch.no_grad():
            for n, p in kv.items():
                p.copy_(self.initial[n])
        self.deltas = self.deltas[:m]
        every = {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in kv.items()}
        return masked_stage(stage_key(m), ctx.pipe.unet, ctx.embeddings, [ctx.token_ids[concept.name]], every, [], self.initial,
                            lr_kv=self.lr_neurons * ctx.kv_lr_scale, lr_token=self.lr_token * ctx.token_lr_scale)

    def end_stage(self, ctx: RunContext, m: int, concept: Concept) -> StageFiles:
        """The concept's own K/V as fp16 deltas from W_0 (the live weights rounded to match) and its token."""
        kv = cross_attention_kv(ctx.pipe.unet)
        every = {n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in kv.items()}
        deltas = {n: d.reshape(kv[n].shape) for n, d in round_to_deltas(dict(kv), self.initial, every).items()}
        self.deltas = self.deltas[:m] + [deltas]
        return StageFiles(
            tensors={CONCEPT_KV_FILE: (deltas, {"format": "delta-fp16"}), TOKEN_FILE: self.token_file(ctx, concept)},
            info={"concept_entries": int(sum(p.numel() for p in kv.values()))},
        )

    def merge(self, ctx: RunContext, m: int) -> None:
        """The live K/V := the constrained merge of concepts 1..m+1 (:func:`constrained_merge`)."""
        self.apply_merge(ctx, m + 1)

    def load(self, ctx: RunContext, stages: list[SavedStage]) -> None:
        """Concepts 1..n's own K/V and tokens from their stages, then their merge (as after stage n)."""
        kv = cross_attention_kv(ctx.pipe.unet)
        self.deltas = []
        for s in stages:
            for f in (CONCEPT_KV_FILE, TOKEN_FILE):
                if f not in s.tensors:
                    raise StageFormatError(f"{s.folder}: has no {f}, so method {self.name!r} cannot load it. Delete that stage folder and rerun the run to redo it.")
            saved = s.tensors[CONCEPT_KV_FILE]
            bad = [n for n in kv if n not in saved or tuple(saved[n].shape) != tuple(kv[n].shape)]
            if bad or set(saved) != set(kv):
                raise StageFormatError(
                    f"{s.folder}/{CONCEPT_KV_FILE}: its layers or shapes do not match the K/V layers of the run's model "
                    f"(first: {(bad or sorted(set(saved) ^ set(kv)))[0]}). The model config or its weights changed since the run; restore with the original model."
                )
            self.deltas.append(dict(saved))
        self.set_token_rows(ctx, stages)
        self.merge(ctx, len(stages) - 1)  # the loop's own merge step after stage n

    # ----------------------------------------------------------------- the merge on the model
    @torch.no_grad()
    def apply_merge(self, ctx: RunContext, n: int) -> None:
        """Write the merge of concepts 1..n into the live K/V (float64 on the model's device)."""
        kv = cross_attention_kv(ctx.pipe.unet)
        device = next(iter(kv.values())).device
        reg_prompts = regularization_prompts(ctx, n)
        if not reg_prompts:
            raise StageFormatError("custom_diffusion's merge needs regularization prompts (calibration prompts or class prompts); none were given")
        c_reg = text_features(ctx, reg_prompts).to(device)
        targets = [text_features(ctx, target_prompts(c), ctx.token_ids[c.name], self.target_positions).to(device) for c in ctx.concepts[:n]]
        c_tgt = torch.cat(targets)
        op = merge_operator(c_tgt, c_reg, self.ridge)
        rank = int(torch.linalg.matrix_rank(c_tgt.double()))
        if rank < c_tgt.shape[0]:
            warnings.warn(
                f"custom_diffusion merge of {n} concepts: {c_tgt.shape[0]} target features span only {rank} dimensions "
                f"(text width {c_tgt.shape[1]}), so the targets are met in least squares, not exactly.", RuntimeWarning, stacklevel=2)
        for name, p in kv.items():
            w0 = self.initial[name].to(device, torch.float64)
            v_tgt = torch.cat([(w0 + self.deltas[i][name].to(device, torch.float64)) @ c.double().T for i, c in enumerate(targets)], dim=1)
            p.copy_(constrained_merge(w0, v_tgt, c_tgt, c_reg, operator=op).to(p.dtype))
