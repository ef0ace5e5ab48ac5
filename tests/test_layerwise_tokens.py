"""Layer-wise token embeddings (``methods/layerwise_tokens.py``, Mix-of-Show's ED-LoRA) on the tiny
model: each cross-attention layer reads its own layer token's text states, gradients reach every
layer's embedding, the pipeline's ``encode_prompt`` and the sampler give the layer-wise states, and
a Mix-of-Show run saves, restores, resumes, generates and exports them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline

from cns_lightning import continual
from cns_lightning.concepts import Concept, ConceptError
from cns_lightning.export import LAYERWISE_JSON, export_pipeline
from cns_lightning.generate import generate
from cns_lightning.methods import layerwise_tokens as lw
from cns_lightning.methods.mix_of_show import LAYERWISE_FILE, MixOfShow
from cns_lightning.methods.base import TOKEN_FILE, RunContext, StageFormatError
from cns_lightning.models import build_random_pipeline
from cns_lightning.restore import load_run
from cns_lightning.sampling import Sampler
from cns_lightning.state import read_stage
from cns_lightning.tokens import add_concept_tokens
from conftest import FAST, compose_cfg, concepts_override, make_concept_folder

PROMPT = "a photo of <new1> teddy bear"


@pytest.fixture()
def layered():
    """A tiny pipeline with one concept token and its layer tokens, each layer row its own random row."""
    pipe = build_random_pipeline("tiny")
    concept = Concept(name="teddy", token="<new1>", class_name="teddy bear")
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [concept])
    tokens = lw.add_layer_tokens(pipe, [concept], ids)
    emb = pipe.text_encoder.get_input_embeddings().weight
    rows = tokens.layer_ids[ids["teddy"]]
    with torch.no_grad():
        emb[rows] = torch.randn(len(rows), emb.shape[1], generator=torch.Generator().manual_seed(0))
    return pipe, tokens, ids["teddy"], rows


def _ids(pipe, text: str) -> torch.Tensor:
    tok = pipe.tokenizer
    return tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def _unet_run(pipe, states: torch.Tensor) -> tuple[dict, dict, torch.Tensor]:
    """Each attn2's to_k input and attn2 output, and the UNet's prediction, for ``states``."""
    inputs, outputs, hooks = {}, {}, []
    for name, attn in lw.cross_attention_layers(pipe.unet):
        hooks.append(attn.to_k.register_forward_hook(lambda m, a, o, n=name: inputs.__setitem__(n, a[0].detach().clone())))
        hooks.append(attn.register_forward_hook(lambda m, a, o, n=name: outputs.__setitem__(n, o.detach().clone())))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            pred = pipe.unet(latents, torch.tensor([10]), states).sample
    finally:
        for h in hooks:
            h.remove()
    return inputs, outputs, pred


def test_the_tiny_unet_has_its_cross_attention_layers_in_mix_of_shows_order(layered):
    _, tokens, _, rows = layered
    assert tokens.layers == ["down_blocks.0.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.0.attn2",
                             "up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up_blocks.1.attentions.1.transformer_blocks.0.attn2"]
    assert len(rows) == tokens.count == 4
    assert layered[0].tokenizer.convert_ids_to_tokens(rows) == ["<new1_p0>", "<new1_p1>", "<new1_p2>", "<new1_p3>"]


def test_sd15_has_mix_of_shows_16_cross_attention_layers():
    from diffusers import UNet2DConditionModel

    from cns_lightning.models import PRESETS

    with torch.device("meta"):  # the architecture only, no weights
        unet = UNet2DConditionModel(**PRESETS["sd15"]["unet"])
    names = [n for n, _ in lw.cross_attention_layers(unet)]
    assert len(names) == 16 and names[5].startswith("down_blocks.2") and names[6].startswith("mid_block") and names[7].startswith("up_blocks.1")
    assert lw.layer_token_names("<new1>", 16)[-1] == "<new1_p15>"


def test_each_cross_attention_layer_reads_the_states_of_its_own_layer_token(layered):
    pipe, tokens, own, rows = layered
    ids = _ids(pipe, PROMPT)
    with torch.no_grad():
        packed = tokens.encode(pipe.text_encoder, ids)
    assert packed.shape == (1, 4 * 77, 32)
    inputs, _, _ = _unet_run(pipe, packed)
    for i, name in enumerate(tokens.layers):
        with torch.no_grad():
            alone = pipe.text_encoder(torch.where(ids == own, rows[i], ids))[0]  # layer i's prompt encoded by itself
        assert torch.allclose(inputs[name], alone, atol=1e-6, rtol=0), name
    firsts = [inputs[n] for n in tokens.layers]
    assert all(not torch.equal(firsts[i], firsts[j]) for i in range(4) for j in range(i))  # four different states


def test_changing_one_layers_embedding_changes_that_layer_only(layered):
    pipe, tokens, _, rows = layered
    ids = _ids(pipe, PROMPT)
    with torch.no_grad():
        before = _unet_run(pipe, tokens.encode(pipe.text_encoder, ids))
        pipe.text_encoder.get_input_embeddings().weight[rows[1]] += 0.5  # the mid block's token only
        after = _unet_run(pipe, tokens.encode(pipe.text_encoder, ids))
    for i, name in enumerate(tokens.layers):
        assert torch.equal(before[0][name], after[0][name]) == (i != 1), f"{name}: text states"
    # layers run down -> mid -> up: the down layer's output is untouched, the mid layer's differs
    assert torch.equal(before[1][tokens.layers[0]], after[1][tokens.layers[0]])
    assert not torch.equal(before[1][tokens.layers[1]], after[1][tokens.layers[1]])
    assert not torch.equal(before[2], after[2])


def test_a_prompt_without_concept_tokens_gives_the_plain_model(layered):
    pipe, tokens, _, _ = layered
    ids = _ids(pipe, "a photo of a teddy bear")
    with torch.no_grad():
        packed = tokens.encode(pipe.text_encoder, ids)
        plain = pipe.text_encoder(ids)[0]
    assert all(torch.equal(block, plain) for block in packed.split(77, dim=1))
    pred = _unet_run(pipe, packed)[2]
    lw.uninstall(pipe)
    assert all(not isinstance(a.processor, lw.LayerwiseAttnProcessor) for _, a in lw.cross_attention_layers(pipe.unet))
    assert torch.allclose(_unet_run(pipe, plain)[2], pred, atol=1e-6, rtol=0)


def test_a_layerwise_unet_refuses_single_states_naming_the_fix(layered):
    pipe, _, _, _ = layered
    with torch.no_grad():
        plain = pipe.text_encoder(_ids(pipe, PROMPT))[0]
    with pytest.raises(ValueError, match=r"cross-attention layer 0 .*77 positions.*4 x 77 = 308.*encode_prompt"):
        _unet_run(pipe, plain)


def test_gradients_reach_every_layers_embedding_and_not_the_unused_token_row(layered):
    pipe, tokens, own, rows = layered
    emb = pipe.text_encoder.get_input_embeddings().weight
    emb.requires_grad_(True)
    packed = tokens.encode(pipe.text_encoder, _ids(pipe, PROMPT))
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    pipe.unet(latents, torch.tensor([10]), packed).sample.square().mean().backward()
    norms = emb.grad[rows].norm(dim=1)
    assert bool((norms > 0).all()), norms
    assert torch.count_nonzero(emb.grad[own]) == 0  # <new1> itself never reaches the text encoder


def test_the_pipelines_encode_prompt_is_layerwise_with_guidance_and_repeats(layered):
    pipe, tokens, _, _ = layered
    cond, uncond = pipe.encode_prompt([PROMPT, "a teddy bear"], "cpu", 2, True)
    assert cond.shape == uncond.shape == (4, 4 * 77, 32)
    with torch.no_grad():
        expected = tokens.encode(pipe.text_encoder, torch.cat([_ids(pipe, PROMPT), _ids(pipe, "a teddy bear")]))
    assert torch.equal(cond, expected.repeat_interleave(2, 0))
    blank, _ = StableDiffusionPipeline.encode_prompt(pipe, "", "cpu", 1, False)  # diffusers' own, for ""
    assert all(torch.equal(block, blank[0]) for block in uncond[0].split(77, dim=0))
    with pytest.raises(ValueError, match="prompt_embeds of shape"):
        pipe.encode_prompt(None, "cpu", 1, False, prompt_embeds=blank)
    images = pipe(PROMPT, num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="latent").images
    assert images.shape == (1, 4, 4, 4)


def test_the_samplers_copy_runs_the_live_processors(layered):
    pipe, _, _, _ = layered
    sampler = Sampler("bf16", on_cpu=True).bind(pipe)  # a bf16 copy of the UNet, built from its config
    assert sampler.pipeline is not pipe
    live, copy = pipe.unet.attn_processors, sampler.pipeline.unet.attn_processors
    assert all(copy[k] is v for k, v in live.items())
    cond, uncond = sampler.embed([PROMPT])
    assert cond.shape == (1, 4 * 77, 32) and cond.dtype == torch.bfloat16
    gens = [torch.Generator().manual_seed(0)]
    assert sampler.sample(cond, uncond, gens, 2, 3.0, 32).shape == (1, 32, 32, 3)
    lw.uninstall(pipe)
    sampler.bind(pipe)  # a later change of the live processors reaches the copy
    assert not any(isinstance(p, lw.LayerwiseAttnProcessor) for p in sampler.pipeline.unet.attn_processors.values())


def test_mix_of_show_without_layerwise_tokens_keeps_one_token_per_concept():
    pipe = build_random_pipeline("tiny")
    concept = Concept(name="teddy", token="<new1>", class_name="teddy bear")
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [concept])
    size = len(pipe.tokenizer)
    MixOfShow(layerwise_tokens=False).setup(RunContext(pipe=pipe, concepts=[concept], token_ids=ids))
    assert lw.installed(pipe) is None and len(pipe.tokenizer) == size
    method = MixOfShow(layerwise_tokens=True)
    for _ in range(2):  # a second setup on the same pipeline reuses its layer tokens
        method.setup(RunContext(pipe=pipe, concepts=[concept], token_ids=ids))
        assert lw.installed(pipe) is method.tokens and len(pipe.tokenizer) == size + 4
    assert not any(isinstance(a.processor.inner, lw.LayerwiseAttnProcessor) for _, a in lw.cross_attention_layers(pipe.unet))  # not wrapped twice
    other = Concept(name="mug", token="<new2>", class_name="mug")
    pipe.tokenizer.add_tokens(["<new2_p1>"])  # a layer token's name taken by another token
    ids |= add_concept_tokens(pipe.tokenizer, pipe.text_encoder, [other])
    with pytest.raises(ConceptError, match=r"data.concepts\[1\].token='<new2>': its layer token '<new2_p1>' is already"):
        lw.add_layer_tokens(pipe, [concept, other], ids)


def test_a_mix_of_show_run_trains_saves_restores_resumes_generates_and_exports_its_layer_tokens(tmp_path):
    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    overrides = [concepts_override(dirs), "method=mix_of_show", *FAST, "~logger", "calibration.num_prompts=4", "method.fusion_steps=2",
                 "eval.enabled=true", "eval.n_images=1", "eval.max_prompts=1", "eval.num_inference_steps=2"]
    cfg = compose_cfg(tmp_path, overrides)
    result = continual.run(cfg)  # training, priors, fusion and evaluation on a layer-wise UNet (it refuses single states)
    assert result["status"] == "complete" and all(s["layerwise_tokens"] == 4 for s in result["stages"])
    assert (tmp_path / "run" / "eval" / "state.json").is_file()  # the evaluation sampled the layer-wise model
    run = tmp_path / "run"
    stages = [read_stage(p) for p in sorted((run / "stages").iterdir())]
    for s in stages:
        rows = s.tensors[LAYERWISE_FILE]["embeddings"]
        assert rows.shape == (4, 32)
        # the rows start equal (the token's row): four different rows means every layer's row trained
        assert all(not torch.equal(rows[i], rows[j]) for i in range(4) for j in range(i))
        assert torch.equal(s.tensors[TOKEN_FILE]["embedding"], rows.mean(0))  # the concept's own row: their mean
        assert json.loads(s.metadata[LAYERWISE_FILE]["layers"])[0].startswith("down_blocks.")

    pipe, learned = load_run(run)
    tokens = lw.installed(pipe)
    emb = pipe.text_encoder.get_input_embeddings().weight
    for s, c in zip(stages, learned):
        own = pipe.tokenizer.convert_tokens_to_ids(c.token)
        assert torch.equal(emb[tokens.layer_ids[own]], s.tensors[LAYERWISE_FILE]["embeddings"])

    shutil.rmtree(sorted((run / "stages").iterdir())[-1])  # stage 2 never finished: the loop resumes after stage 1
    r = continual.check_inputs(cfg)
    continual.build(r)
    continual.make_priors(r)
    continual.restore(r)
    first = r.ctx.token_ids[r.concepts[0].name]
    assert torch.equal(r.ctx.embeddings[r.method.tokens.layer_ids[first]], stages[0].tensors[LAYERWISE_FILE]["embeddings"])

    out = generate(run, ["a <new1> teddy bear"], n=1, steps=2, stage=1, out=tmp_path / "gen")
    assert (out / "p00_i00.png").is_file()

    exported = export_pipeline(run, tmp_path / "export", stage=1)
    assert "**Note.** This run trained layer-wise token embeddings" in (exported / "README.md").read_text()
    description = json.loads((exported / LAYERWISE_JSON).read_text())
    assert description["concepts"][0]["layer_tokens"] == ["<new1_p0>", "<new1_p1>", "<new1_p2>", "<new1_p3>"]
    plain = StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
    restored, _ = load_run(run, 1, tokens="learned")
    lw.LayerwiseTokens.from_description(description, plain.tokenizer).install(plain)  # the exact model again
    assert torch.equal(plain.encode_prompt(PROMPT, "cpu", 1, True)[0], restored.encode_prompt(PROMPT, "cpu", 1, True)[0])


def test_a_run_folder_from_before_the_knob_restores_with_one_token_and_refuses_to_resume_layerwise(tmp_path):
    from cns_lightning.continual import RunError
    from cns_lightning.restore import CONFIG
    from cns_lightning.run_folder import IDENTITY_FILE

    dirs = [make_concept_folder(tmp_path / "data" / n, n=3, seed=k) for k, n in enumerate(("teddy", "mug"))]
    base = [concepts_override(dirs), "method=mix_of_show", *FAST, "~logger", "calibration.num_prompts=4", "method.fusion_steps=2"]
    continual.run(compose_cfg(tmp_path, [*base, "method.layerwise_tokens=false"]))
    run = tmp_path / "run"
    assert not any((p / LAYERWISE_FILE).exists() for p in (run / "stages").iterdir())
    shutil.rmtree(sorted((run / "stages").iterdir())[-1])
    with pytest.raises(RunError, match=r"method.layerwise_tokens differ"):  # the default (true) is another run
        continual.run(compose_cfg(tmp_path, base))
    # as a folder written before the knob: neither its config nor its identity names it
    config = run / CONFIG
    text = config.read_text()
    assert "  layerwise_tokens: false\n" in text
    config.write_text(text.replace("  layerwise_tokens: false\n", ""))
    identity = json.loads((run / IDENTITY_FILE).read_text())
    del identity["method"]["layerwise_tokens"]
    (run / IDENTITY_FILE).write_text(json.dumps(identity))
    pipe, _ = load_run(run)  # its own model: one token per concept
    assert lw.installed(pipe) is None
    with pytest.raises(RunError, match=r"method.layerwise_tokens differ"):  # the current default cannot continue it
        continual.run(compose_cfg(tmp_path, base))
    assert continual.run(compose_cfg(tmp_path, [*base, "method.layerwise_tokens=false"]))["status"] == "complete"
    assert not any((p / LAYERWISE_FILE).exists() for p in (run / "stages").iterdir())
    # a stage folder without the file, loaded layer-wise (e.g. by hand): the error names the fix
    method = MixOfShow(layerwise_tokens=True)
    stages = [read_stage(p) for p in sorted((run / "stages").iterdir())]
    pipe = build_random_pipeline("tiny")
    concepts = [Concept(name=s.info["concept"], token=s.info["token"], class_name=s.info["class_name"]) for s in stages]
    ctx = RunContext(pipe=pipe, concepts=concepts, token_ids=add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts))
    method.setup(ctx)
    with pytest.raises(StageFormatError, match=r"has no layerwise_tokens.safetensors: .*Resume or restore it with method.layerwise_tokens=false"):
        method.load(ctx, stages)
