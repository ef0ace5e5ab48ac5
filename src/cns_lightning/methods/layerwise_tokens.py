"""Layer-wise token embeddings: ED-LoRA's (Gu et al., "Mix-of-Show", NeurIPS 2023, Sec. 3.2)
one embedding of a concept's token per UNet cross-attention layer.

A concept with token ``<new1>`` gets L more tokens ``<new1_p0>`` .. ``<new1_p{L-1}>`` (Mix-of-Show's
``<concept_p0>`` .. ``<concept_p15>``; L = 16 ``attn2`` layers on SD-1.5), one per cross-attention
layer in Mix-of-Show's order (``down_blocks``, ``mid_block``, ``up_blocks``:
:func:`cross_attention_layers`). Cross-attention layer i reads the text encoder's states of the
prompt in which every concept's token is replaced by its layer-i token.

How the states travel (``encode`` builds them, the processors read them): one tensor
(n, L * T, d), T the tokenizer's 77 positions, block i (positions i*T .. (i+1)*T) the states of
layer i's prompt. A (n, L*T, d) tensor goes through every caller of the UNet unchanged (the
diffusers pipeline's classifier-free-guidance concatenation and ``num_images_per_prompt`` repeat,
the project's sampler, padding and prior-prompt cache), and :class:`LayerwiseAttnProcessor` on
attn2 layer i hands its inner processor block i only. Mix-of-Show's own pipeline passes a
(n, L, T, d) tensor instead, which diffusers' ``encode_prompt`` cannot take.

The text encoder runs once per call of ``encode``, on one batch: L rows (its L layer prompts) for
each prompt holding a concept token, one row for each other prompt (its L layer prompts are the
same prompt; the row is used at every layer). On a GPU, splitting the batch so costs one host sync
per call (the rows with a concept token are found on the device).

:meth:`LayerwiseTokens.install` makes a pipeline layer-wise: the processors on its UNet, and
``pipe.encode_prompt`` replaced by :meth:`LayerwiseTokens.encode_prompt` (same signature and
results' layout as diffusers'), so ``pipe(prompt)``, the sampler (prior images, evaluation) and
Mix-of-Show's fusion recording get the layer-wise states. A UNet with the processors refuses
states that are not (n, L*T, d) (naming the layer and the fix), so no caller can silently feed
every layer the single token.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import torch
from torch import nn

INSTALLED = "cns_layerwise_tokens"  # the attribute of a pipeline that holds its LayerwiseTokens


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, attention) of every cross-attention ``attn2`` of ``unet``, in Mix-of-Show's
    order: ``down_blocks``, then ``mid_block``, then ``up_blocks`` (``revise_edlora_unet_attention_forward``)."""
    out = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        block = getattr(unet, part, None)
        if block is None:
            continue
        out += [(f"{part}.{n}", m) for n, m in block.named_modules() if n.split(".")[-1] == "attn2" and hasattr(m, "set_processor")]
    return out


def layer_token_names(token: str, count: int) -> list[str]:
    """The layer tokens of ``token``: ``<new1>`` -> ``<new1_p0>`` .. ``<new1_p{count-1}>`` (Mix-of-Show's ``_p{i}`` names)."""
    core = token[1:-1] if token.startswith("<") and token.endswith(">") else token
    return [f"<{core}_p{i}>" for i in range(count)]


class LayerwiseAttnProcessor:
    """Cross-attention layer ``index`` of ``count``: its ``inner`` processor gets block ``index`` of
    the (n, count * length, d) layer-wise states (and of a key mask of that length)."""

    def __init__(self, index: int, count: int, length: int, inner: Any, name: str = ""):
        self.index, self.count, self.length, self.inner, self.name = int(index), int(count), int(length), inner, str(name)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        full = self.count * self.length
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] != full:
            got = "none" if encoder_hidden_states is None else f"{encoder_hidden_states.shape[1]} positions"
            raise ValueError(
                f"cross-attention layer {self.index} ({self.name}) of a layer-wise-token UNet got text states of {got}; it needs "
                f"the {self.count} x {self.length} = {full} positions of layerwise_tokens.LayerwiseTokens.encode (one block per "
                "layer). Encode prompts with the pipeline's encode_prompt (installed by LayerwiseTokens.install), not the text encoder alone."
            )
        lo, hi = self.index * self.length, (self.index + 1) * self.length
        states = encoder_hidden_states[:, lo:hi]
        if attention_mask is not None and attention_mask.shape[-1] == full:
            attention_mask = attention_mask[..., lo:hi]
        return self.inner(attn, hidden_states, states, attention_mask, temb, *args, **kwargs)


class LayerwiseTokens:
    """Every concept's layer tokens (``layer_ids``: concept token id -> its L layer-token ids, in
    :func:`cross_attention_layers` order), the layers' names and T (``length``)."""

    def __init__(self, layer_ids: dict[int, list[int]], layers: Sequence[str], length: int):
        self.layer_ids = {int(k): [int(i) for i in v] for k, v in layer_ids.items()}
        self.layers = list(layers)
        self.length = int(length)
        bad = [k for k, v in self.layer_ids.items() if len(v) != len(self.layers)]
        if bad:
            raise ValueError(f"token ids {bad}: each concept needs one layer token per cross-attention layer ({len(self.layers)})")

    @property
    def count(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------ prompts
    def layer_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(L, n, T): ``input_ids`` with every concept token replaced by its layer-i token in row i."""
        out = input_ids.unsqueeze(0).repeat(self.count, 1, 1)
        for cid, lids in self.layer_ids.items():
            hit = input_ids == cid
            out[:, hit] = torch.tensor(lids, dtype=input_ids.dtype, device=input_ids.device).unsqueeze(1)
        return out

    def encode(self, text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
        """The layer-wise states (n, L*T, d) of ``input_ids`` (n, T): one text-encoder call (the L
        layer prompts of each prompt with a concept token, each other prompt once)."""
        n, t = input_ids.shape
        if t != self.length:
            raise ValueError(f"input ids of {t} positions; the layer-wise tokens were set up for {self.length} (the tokenizer's model_max_length)")
        concept = torch.tensor(list(self.layer_ids), dtype=input_ids.dtype, device=input_ids.device)
        has = torch.isin(input_ids, concept).any(1)
        plain, tokened = (~has).nonzero().flatten(), has.nonzero().flatten()
        variants = self.layer_input_ids(input_ids[tokened]).reshape(-1, t)  # layer-major: row i*k + j
        hidden = text_encoder(torch.cat([input_ids[plain], variants]))[0]
        # where each (prompt, layer) block sits in ``hidden``
        index = torch.empty(n, self.count, dtype=torch.long, device=input_ids.device)
        index[plain] = torch.arange(len(plain), device=input_ids.device).unsqueeze(1)
        k = len(tokened)
        index[tokened] = len(plain) + torch.arange(self.count, device=input_ids.device).unsqueeze(0) * k + torch.arange(k, device=input_ids.device).unsqueeze(1)
        return hidden[index.reshape(-1)].reshape(n, self.count * t, hidden.shape[-1])

    def encode_texts(self, pipe, texts: Sequence[str], device) -> torch.Tensor:
        ids = pipe.tokenizer(list(texts), padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids.to(device)
        return self.encode(pipe.text_encoder, ids)

    def encode_prompt(self, pipe, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                      lora_scale: float | None = None, clip_skip: int | None = None):
        """diffusers' ``StableDiffusionPipeline.encode_prompt`` with layer-wise states: returns
        (cond, uncond or None), each (batch * num_images_per_prompt, L*T, d) in the text encoder's dtype."""
        if clip_skip is not None or lora_scale not in (None, 1.0):
            raise ValueError("a layer-wise-token pipeline encodes with the text encoder's last layer at LoRA scale 1: leave clip_skip and lora_scale unset")
        full = self.count * self.length
        for what, e in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if e is not None and (e.ndim != 3 or e.shape[1] != full):
                raise ValueError(f"{what} of shape {tuple(e.shape)}: a layer-wise-token pipeline needs (n, {full}, d) states from LayerwiseTokens.encode")
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype
        if prompt_embeds is None:
            texts = [prompt] if isinstance(prompt, str) else list(prompt)
            with torch.no_grad():
                prompt_embeds = self.encode_texts(pipe, texts, device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, 0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            neg = [""] * batch if negative_prompt is None else ([negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(neg) != batch:
                raise ValueError(f"negative_prompt has {len(neg)} entries for {batch} prompts")
            with torch.no_grad():
                negative_prompt_embeds = self.encode_texts(pipe, neg, device)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds

    # ------------------------------------------------------------ the pipeline
    def install(self, pipe) -> "LayerwiseTokens":
        """Make ``pipe`` layer-wise (see the module docstring); again on the same pipeline replaces the earlier install."""
        uninstall(pipe)
        layers = cross_attention_layers(pipe.unet)
        names = [n for n, _ in layers]
        if names != self.layers:
            raise ValueError(f"the UNet's cross-attention layers ({len(names)}) are not the {self.count} the layer tokens were made for; "
                             "restore with the run's original model")
        for i, (name, attn) in enumerate(layers):
            attn.set_processor(LayerwiseAttnProcessor(i, self.count, self.length, attn.processor, name))
        object.__setattr__(pipe, INSTALLED, self)
        object.__setattr__(pipe, "encode_prompt", lambda *a, **k: self.encode_prompt(pipe, *a, **k))
        return self

    @classmethod
    def from_description(cls, description: dict, tokenizer) -> "LayerwiseTokens":
        """The layer tokens that :meth:`describe` wrote (an export's ``cns_layerwise_tokens.json``),
        on the ids of ``tokenizer`` (the exported one): ``.install(pipe)`` then makes a plain pipeline
        loaded from the export the trained layer-wise model again."""
        ids = {}
        for c in description["concepts"]:
            own, rows = tokenizer.convert_tokens_to_ids(c["token"]), tokenizer.convert_tokens_to_ids(c["layer_tokens"])
            if own == tokenizer.unk_token_id or tokenizer.unk_token_id in rows:
                raise ValueError(f"concept {c['name']!r}: its token {c['token']} or a layer token is not in the tokenizer; "
                                 "load the tokenizer of the folder the description came from")
            ids[own] = rows
        return cls(ids, description["layers"], int(description["positions"]))

    def describe(self, concepts: Sequence[Any], tokenizer) -> dict:
        """What an export writes (``cns_layerwise_tokens.json``): per concept its layer tokens, in layer order."""
        return dict(
            layers=self.layers, positions=self.length,
            concepts=[dict(name=c.name, token=c.token, layer_tokens=[tokenizer.convert_ids_to_tokens(i) for i in self.layer_ids[tokenizer.convert_tokens_to_ids(c.token)]])
                      for c in concepts if tokenizer.convert_tokens_to_ids(c.token) in self.layer_ids],
        )


def installed(pipe) -> LayerwiseTokens | None:
    """The :class:`LayerwiseTokens` installed on ``pipe``, or None (a plain pipeline)."""
    return pipe.__dict__.get(INSTALLED)


def uninstall(pipe) -> None:
    """Give ``pipe`` back its own processors and ``encode_prompt``."""
    if installed(pipe) is None:
        return
    for _, attn in cross_attention_layers(pipe.unet):
        if isinstance(attn.processor, LayerwiseAttnProcessor):
            attn.set_processor(attn.processor.inner)
    pipe.__dict__.pop(INSTALLED, None)
    pipe.__dict__.pop("encode_prompt", None)


def add_layer_tokens(pipe, concepts: Sequence[Any], token_ids: dict[str, int]) -> LayerwiseTokens:
    """Add every concept's layer tokens (:func:`layer_token_names`) to ``pipe``'s tokenizer and text
    encoder, each row starting from the concept's token row (Mix-of-Show initialises every layer
    token from the same initializer token), and install them (:meth:`LayerwiseTokens.install`).
    On a pipeline that has them already (a second ``setup``), the same tokens are reused and reset."""
    from ..concepts import ConceptError

    layers = [n for n, _ in cross_attention_layers(pipe.unet)]
    tok, te = pipe.tokenizer, pipe.text_encoder
    before = installed(pipe)
    vocab = tok.get_vocab()
    names = {c.name: layer_token_names(c.token, len(layers)) for c in concepts}
    for i, c in enumerate(concepts):
        own = before is not None and token_ids[c.name] in before.layer_ids
        clash = [t for t in names[c.name] if t in vocab]
        if clash and not own:
            raise ConceptError(f"data.concepts[{i}].token={c.token!r}: its layer token {clash[0]!r} is already in the tokenizer's vocabulary; "
                               f"pick another token (method.layerwise_tokens adds {names[c.name][0]} .. {names[c.name][-1]})")
    new = [t for c in concepts for t in names[c.name] if t not in vocab]
    if new:
        tok.add_tokens(new)
        was = te.get_input_embeddings().weight.requires_grad
        te.resize_token_embeddings(len(tok), mean_resizing=False)
        te.get_input_embeddings().weight.requires_grad_(was)
    emb = te.get_input_embeddings().weight
    layer_ids = {}
    with torch.no_grad():
        for c in concepts:
            ids = tok.convert_tokens_to_ids(names[c.name])
            emb[ids] = emb[token_ids[c.name]].clone().unsqueeze(0).expand(len(ids), -1)
            layer_ids[token_ids[c.name]] = ids
    return LayerwiseTokens(layer_ids, layers, tok.model_max_length).install(pipe)


def metadata(tokens: LayerwiseTokens, names: Sequence[str]) -> dict[str, str]:
    """safetensors metadata of a stage's layer-wise file: the layers and the token names, in row order."""
    return {"layers": json.dumps(tokens.layers), "tokens": json.dumps(list(names))}
