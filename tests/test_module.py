"""The LightningModule drives a method's stage: a masked stage changes only its mask's K/V entries
and its own token, bit-exact; L_reg's gradient is finite and enters a step once."""

import lightning as L
import pytest
import torch

from cns_lightning.concepts import Concept
from cns_lightning.data import ConceptDataModule
from cns_lightning.methods.stage import masked_stage
from cns_lightning.models import build_random_pipeline, cross_attention_kv
from cns_lightning.module import ContinualModule
from cns_lightning.tokens import add_concept_tokens

from conftest import make_concept_folder


def _snapshot(pipe):
    return {f"unet.{n}": p.detach().clone() for n, p in pipe.unet.named_parameters()} | {
        f"text.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()
    } | {f"vae.{n}": p.detach().clone() for n, p in pipe.vae.named_parameters()}


def _masked_stage(pipe, ids, concept, masks, earlier, lr=1e-2, lambdas=(1.0, 1.0)):
    if not hasattr(pipe, "_w0"):  # W_0: the K/V weights before the first stage
        pipe._w0 = {n: p.detach().clone() for n, p in cross_attention_kv(pipe.unet).items()}
    return masked_stage(concept.name, pipe.unet, pipe.text_encoder.get_input_embeddings().weight, [ids[concept.name]], masks, earlier,
                        pipe._w0, lr, lr, *lambdas)


def _stage(pipe, module, concepts, ids, m, masks, earlier, steps=6):
    module.begin_stage(_masked_stage(pipe, ids, concepts[m], masks, earlier))
    dm = ConceptDataModule(concepts[m], pipe.tokenizer, 32, steps=steps, batch_size=2, vae=pipe.vae, seed=m,
                           prior_images=concepts[m].image_paths(), prior_prompt="a toy")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    module.end_stage()


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    pipe = build_random_pipeline("tiny")
    concepts = [
        Concept(name=f"c{i}", token=f"<new{i + 1}>", class_name="toy", path=make_concept_folder(tmp_path / f"c{i}", seed=i))
        for i in range(2)
    ]
    ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
    return pipe, ContinualModule(pipe), concepts, ids


def _random_masks(pipe, density, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < density for n, p in cross_attention_kv(pipe.unet).items()}


def test_stage_changes_only_masked_entries_and_own_token(setup):
    pipe, module, concepts, ids = setup
    masks0 = _random_masks(pipe, 0.2, 0)
    _stage(pipe, module, concepts, ids, 0, masks0, [])
    masks1 = _random_masks(pipe, 0.2, 1)  # overlaps masks0: L_reg is active
    before = _snapshot(pipe)
    _stage(pipe, module, concepts, ids, 1, masks1, [masks0])
    after = _snapshot(pipe)
    kv_names = {f"unet.{n}" for n in cross_attention_kv(pipe.unet)}
    emb_name = "text." + next(n for n, p in pipe.text_encoder.named_parameters() if p is pipe.text_encoder.get_input_embeddings().weight)
    changed_inside = 0
    for name, b in before.items():
        a = after[name]
        if name in kv_names:
            m = masks1[name[len("unet."):]]
            assert torch.equal(a[~m], b[~m]), f"{name}: an entry outside the concept mask changed"
            changed_inside += int((a[m] != b[m]).sum())
        elif name == emb_name:
            own = ids[concepts[1].name]
            rows = torch.ones(a.shape[0], dtype=torch.bool)
            rows[own] = False
            assert torch.equal(a[rows], b[rows]), "another token embedding changed"
            assert not torch.equal(a[own], b[own]), "the concept's own token did not train"
        else:
            assert torch.equal(a, b), f"{name} changed but is not trainable"
    assert changed_inside > 0, "no masked entry trained"
    assert not any(p.requires_grad for p in pipe.unet.parameters()) and not pipe.text_encoder.get_input_embeddings().weight.requires_grad


def test_reg_gradient_finite_at_first_step(setup):
    pipe, module, concepts, ids = setup
    m = _random_masks(pipe, 0.3, 0)
    stage = _masked_stage(pipe, ids, concepts[1], m, [m])  # full overlap: M = mask_1
    module.begin_stage(stage)
    loss = stage.extra_loss(torch.device("cpu"))  # Eq. 7 per layer (no optimizer yet), W_m == W_{m-1} here
    assert loss.requires_grad
    loss.backward()
    for n in stage.reg.overlap:
        assert torch.isfinite(stage.kv[n][0].grad).all()
    module.end_stage()


def test_compiled_training_step_matches_eager(tmp_path):
    """enable_speedups(compile=...) swaps in compiled UNet and text-encoder callables for the training
    step (on the GPU with Inductor and CUDA graphs); traced here with AOT autograd's eager backend,
    two stages (the second with L_reg) end with the weights of the eager run."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        pipe = build_random_pipeline("tiny")
        concepts = [Concept(name=f"c{i}", token=f"<new{i + 1}>", class_name="toy", path=make_concept_folder(tmp_path / f"k{i}", seed=i)) for i in range(2)]
        ids = add_concept_tokens(pipe.tokenizer, pipe.text_encoder, concepts)
        module = ContinualModule(pipe)
        if compiled:
            module.enable_speedups(compile={"backend": "aot_eager"})
            assert set(module._fast) == {"unet", "text_encoder"}
        torch.manual_seed(1)
        masks = [_random_masks(pipe, 0.2, m) for m in range(2)]
        for m in range(2):
            _stage(pipe, module, concepts, ids, m, masks[m], masks[:m], steps=3)
        results.append(_snapshot(pipe))
    eager, compiled = results
    for name, a in eager.items():
        torch.testing.assert_close(compiled[name], a, rtol=1e-5, atol=1e-6, msg=name)


def test_reg_gradient_enters_a_step_once_whatever_the_gradient_accumulation(setup):
    """trainer.accumulate_grad_batches = k: Lightning scales each micro-batch's loss by 1/k and the
    compact gradients add up over the k backwards; L_reg's gradient (added after each backward) is
    scaled the same way, so one optimizer step sees it once."""
    pipe, module, concepts, ids = setup
    masks = _random_masks(pipe, 0.3, 0)
    _stage(pipe, module, concepts, ids, 0, masks, [], steps=3)  # now W_{m-1} != W_0: the lambda2 term pulls
    stage = _masked_stage(pipe, ids, concepts[1], masks, [masks])  # full overlap: M = mask_1
    module.begin_stage(stage)
    grads = {}
    for k in (1, 3):
        module.trainer = L.Trainer(accelerator="cpu", accumulate_grad_batches=k, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        opt = module.configure_optimizers()
        for _ in range(k):  # k micro-batches (no diffusion loss here: only L_reg's gradient)
            stage.extra_loss(torch.device("cpu"))
            module.on_after_backward()
        grads[k] = opt.param_groups[0]["params"][0].grad.clone()
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[3], grads[1])
    module.end_stage()
