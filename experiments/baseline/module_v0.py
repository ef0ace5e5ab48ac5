# Baseline for experiments/bench_gpu.py only: src/cns_lightning/module.py as of commit 82654f9,
# before the GPU speed work (issue 5). Not used by the package.
"""The LightningModule: an SD UNet + text encoder with per-concept mask buffers.

One module lives through the whole continual sequence (one model holds every concept). Before
each stage the loop calls ``begin_stage`` with the concept's masks and token; ``Trainer.fit``
then trains only those K/V entries and that token row; ``end_stage`` removes the hooks.
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import DDPMScheduler

from cns_lightning.losses import overlap_masks, prior_preservation_loss, regularization_loss
from masking_v0 import MaskedParam, MaskedUpdates, row_mask
from cns_lightning.models import cross_attention_kv


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the stage is abandoned and the last good stage kept."""


def _buffer_key(layer: str) -> str:
    return layer.replace(".", "__")


class MaskSet(torch.nn.Module):
    """One concept's masks, as registered buffers (so they are in the module's state_dict)."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        super().__init__()
        self.layers = list(masks)
        for name, m in masks.items():
            self.register_buffer(_buffer_key(name), m.bool().clone())

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _buffer_key(name)) for name in self.layers}


class CNSModule(L.LightningModule):
    def __init__(
        self,
        pipe,
        lr_neurons: float = 3e-5,
        lr_token: float = 5e-4,
        prior_weight: float = 1.0,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nan_check_every: int = 1,
        log_every: int = 10,
    ):
        super().__init__()
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for m in (self.unet, self.text_encoder, self.vae):
            m.requires_grad_(False)
        self.vae.eval()
        self.hp = dict(
            lr_neurons=lr_neurons, lr_token=lr_token, prior_weight=prior_weight, lambda1=lambda1,
            lambda2=lambda2, betas=tuple(betas), eps=eps,
        )
        self.nan_check_every = max(1, int(nan_check_every))
        self.log_every = max(1, int(log_every))
        self.kv_names = list(cross_attention_kv(self.unet))
        self.masks = torch.nn.ModuleDict()  # concept key -> MaskSet (registered buffers)
        # W_0 of Eq. 7: the K/V weights before any concept (non-persistent: they are the base model).
        for i, (_, p) in enumerate(cross_attention_kv(self.unet).items()):
            self.register_buffer(f"kv_initial_{i}", p.detach().clone(), persistent=False)
        self.step_offset = 0  # global step across stages, for loggers
        self._stage: dict | None = None

    # ------------------------------------------------------------------ state
    def kv(self) -> dict[str, torch.nn.Parameter]:
        return cross_attention_kv(self.unet)

    def kv_initial(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"kv_initial_{i}") for i, n in enumerate(self.kv_names)}

    def add_masks(self, key: str, masks: dict[str, torch.Tensor]) -> None:
        """Register a concept's masks as buffers (replacing any earlier ones under that key)."""
        device = next(self.unet.parameters()).device
        self.masks[key] = MaskSet({n: masks[n].to(device) for n in self.kv_names})

    def concept_masks(self, key: str) -> dict[str, torch.Tensor]:
        return self.masks[key].as_dict()

    # ------------------------------------------------------------------ stage
    def begin_stage(self, key: str, token_ids: list[int], earlier: list[str], train_kv: bool = True) -> None:
        """Set up training of concept ``key``: its K/V mask entries and its token rows only.

        ``earlier`` names the concepts learned before, whose masks define M of Eq. 7.
        """
        self.end_stage()
        kv = self.kv()
        masks = self.concept_masks(key)
        embeddings = self.text_encoder.get_input_embeddings().weight
        kv_pairs: dict[str, MaskedParam] = {}
        for name, p in kv.items():
            if train_kv and bool(masks[name].any()):
                p.requires_grad_(True)
                kv_pairs[name] = MaskedParam(p, masks[name])
        trainable_kv = {name: mp.param for name, mp in kv_pairs.items()}
        previous = {name: mp.reference for name, mp in kv_pairs.items()}  # W_{m-1} of Eq. 7
        embeddings.requires_grad_(True)
        token_pair = MaskedParam(embeddings, row_mask(embeddings.shape[0], token_ids, embeddings.device))
        updates = MaskedUpdates([*kv_pairs.values(), token_pair])
        updates.attach_gradient_masks()
        overlap = overlap_masks(masks, [self.concept_masks(k) for k in earlier])
        self._stage = dict(
            key=key, updates=updates, trainable_kv=trainable_kv, embeddings=embeddings,
            overlap={n: m for n, m in overlap.items() if n in trainable_kv}, previous=previous,
        )

    def end_stage(self) -> None:
        if self._stage is None:
            return
        self._stage["updates"].detach()
        for p in self.kv().values():
            p.requires_grad_(False)
        self.text_encoder.get_input_embeddings().weight.requires_grad_(False)
        self._stage = None

    # --------------------------------------------------------------- training
    def configure_optimizers(self):
        if self._stage is None:
            raise RuntimeError("begin_stage() must be called before Trainer.fit")
        groups = []
        if self._stage["trainable_kv"]:
            groups.append({"params": list(self._stage["trainable_kv"].values()), "lr": self.hp["lr_neurons"], "name": "neurons"})
        groups.append({"params": [self._stage["embeddings"]], "lr": self.hp["lr_token"], "name": "token"})
        # No weight decay: decay would move entries outside the masks (the restore hook would undo it,
        # but the optimizer must not fight the guarantee).
        opt = torch.optim.Adam(groups, betas=self.hp["betas"], eps=self.hp["eps"], weight_decay=0.0)
        self._stage["updates"].attach_to_optimizer(opt)
        return opt

    def _latents(self, batch: dict, prefix: str) -> torch.Tensor:
        if f"{prefix}_mean" in batch:  # cached VAE posterior: sample it
            mean, std = batch[f"{prefix}_mean"], batch[f"{prefix}_std"]
            return (mean + std * torch.randn_like(std)) * self.vae.config.scaling_factor
        with torch.no_grad():
            pixels = batch[f"{prefix}_pixels"].to(self.vae.dtype)
            return self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor

    def training_step(self, batch: dict, batch_idx: int):
        has_prior = "prior_input_ids" in batch
        latents = self._latents(batch, "instance")
        ids = batch["instance_input_ids"]
        if has_prior:
            latents = torch.cat([latents, self._latents(batch, "prior")])
            ids = torch.cat([ids, batch["prior_input_ids"]])
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        cond = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, cond).sample
        target = noise if self.noise_scheduler.config.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        n = batch["instance_input_ids"].shape[0]
        if has_prior:
            loss, concept_term, prior_term = prior_preservation_loss(pred[:n], target[:n], pred[n:], target[n:], self.hp["prior_weight"])
        else:
            loss = concept_term = torch.nn.functional.mse_loss(pred.float(), target.float())
            prior_term = torch.zeros((), device=loss.device)
        reg = torch.zeros((), device=loss.device)
        stage = self._stage
        if stage["overlap"]:
            reg = regularization_loss(
                {n: stage["trainable_kv"][n] for n in stage["overlap"]},
                stage["previous"], self.kv_initial(), stage["overlap"], self.hp["lambda1"], self.hp["lambda2"],
            )
        total = loss + reg
        if (self.global_step % self.nan_check_every == 0) and not torch.isfinite(total).item():
            raise NonFiniteLossError(
                f"training loss became {total.item()} at step {self.global_step} of concept {stage['key']!r}"
            )
        if self.logger is not None and self.global_step % self.log_every == 0:
            self.logger.log_metrics(
                {
                    "train/loss": float(total.detach()), "train/diffusion": float(concept_term.detach()),
                    "train/prior": float(prior_term.detach()), "train/reg": float(reg.detach()),
                },
                step=self.step_offset + self.global_step,
            )
        return total
