"""The LightningModule: the diffusion training step of an SD UNet + text encoder, for any method.

One module lives through the whole continual sequence (one model holds every concept). Before
each stage the loop hands it the method's stage (``begin_stage(stage)``, a
``methods.stage.TrainingStage``): what trains, with which optimizer, which extra loss term (L_reg
of CNS) and hooks after the backward; ``Trainer.fit`` then runs the generic step here (diffusion
loss + prior preservation, Eq. 8); ``end_stage`` freezes everything again.

Speed (GPU): the prior prompt's text embedding (none of its tokens train) is computed once per
stage; the NaN check and the logged metrics travel to the host asynchronously (no per-step host
sync); ``enable_speedups`` (``speedups.SpeedUps`` callback) adds ``torch.compile`` and
channels-last. See docs/benchmarks.md.
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import DDPMScheduler

from .losses import prior_preservation_loss
from .methods.stage import TrainingStage


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; the stage is abandoned and the last good stage kept."""


class ContinualModule(L.LightningModule):
    def __init__(self, pipe, prior_weight: float = 1.0, nan_check_every: int = 1, log_every: int = 10, cache_prior_text: bool = True):
        super().__init__()
        self.unet = pipe.unet
        self.text_encoder = pipe.text_encoder
        self.vae = pipe.vae
        self.tokenizer = pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for m in (self.unet, self.text_encoder, self.vae):
            m.requires_grad_(False)
        self.vae.eval()
        self.prior_weight = float(prior_weight)
        self.nan_check_every = max(1, int(nan_check_every))
        self.log_every = max(1, int(log_every))
        self.step_offset = 0  # global step across stages, for loggers
        self.cache_prior_text = bool(cache_prior_text)
        self.stage: TrainingStage | None = None
        self._fast: dict = {}  # compiled callables (kept out of the module tree and the state_dict)
        self._text_cache: dict[bytes, torch.Tensor] = {}
        self._pending: list = []  # (kind, step, event, host tensor): async NaN flags and metrics
        self._first_bad: torch.Tensor | None = None

    # --------------------------------------------------------------- speed-ups
    def enable_speedups(self, compile: bool | dict = False, channels_last: bool = False, regional: bool = False) -> None:
        """Channels-last UNet weights and/or a ``torch.compile``d UNet and text encoder for training
        steps only.

        Generation (prior images, evaluation), selection and the cached prior-prompt embeddings keep
        calling the plain modules, so they never trigger a recompile; the compiled callables share
        the same parameters. ``regional``: compile the UNet's repeated transformer blocks only
        (diffusers' ``compile_repeated_blocks``: one graph reused by all of them, a fraction of the
        whole UNet's compile time; in place, so every caller of the live UNet runs those blocks
        compiled; the evaluation and prior sampler use their own bf16 copy).
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self._fast["channels_last"] = True
        if compile and "unet" not in self._fast:
            kwargs = {str(k): v for k, v in compile.items()} if hasattr(compile, "items") else {}  # dict or DictConfig
            kwargs.setdefault("dynamic", False)
            if regional:
                self.unet.compile_repeated_blocks(**kwargs)
                self._fast["unet"] = self.unet
            else:
                self._fast["unet"] = torch.compile(self.unet, **kwargs)
            # The instance prompts' text encoder forward and backward (the new token trains through
            # all its layers): eager, it is hundreds of small kernels and most of a step's host time.
            self._fast["text_encoder"] = torch.compile(self.text_encoder, **kwargs)

    # ------------------------------------------------------------------ stage
    def begin_stage(self, stage: TrainingStage) -> None:
        """Train ``stage`` (a method's ``begin_stage``) in the next ``Trainer.fit``."""
        self.end_stage()
        self.stage = stage
        self._text_cache.clear()
        self._pending.clear()
        self._first_bad = None

    def end_stage(self) -> None:
        if self.stage is not None:
            self.stage.end()
            self.stage = None

    # --------------------------------------------------------------- training
    def configure_optimizers(self):
        if self.stage is None:
            raise RuntimeError("begin_stage() must be called before Trainer.fit")
        return self.stage.configure_optimizer()

    def on_after_backward(self) -> None:
        if self.stage is not None:
            # Lightning divides each micro-batch's loss by accumulate_grad_batches: the stage's own
            # gradient terms (L_reg) are scaled the same way.
            self.stage.after_backward(self._trainer.accumulate_grad_batches if self._trainer is not None else 1)

    def on_fit_start(self) -> None:
        # DDP: every rank starts from the same seed; give each its own noise, timesteps and flips.
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.trainer.global_rank)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Mark a batch whose prior prompts are one prompt with no trainable token, in a stage whose
        text encoder's weights do not train (``stage.trains_text_encoder``; still on the CPU,
        so no host sync): its text embedding is computed once per stage (``_prior_condition``)."""
        ids = batch.get("prior_input_ids") if isinstance(batch, dict) else None
        if not self.cache_prior_text or self.stage is None or ids is None or ids.device.type != "cpu" or getattr(self.stage, "trains_text_encoder", False):
            return batch
        first = ids[:1]
        trainable = torch.tensor(self.stage.token_ids, dtype=ids.dtype)
        if bool((ids == first).all()) and not bool(torch.isin(first, trainable).any()):
            batch["prior_text_key"] = first.numpy().tobytes()
        return batch

    def _prior_condition(self, batch: dict) -> torch.Tensor:
        ids = batch["prior_input_ids"]
        key = batch.get("prior_text_key")
        if key is None:
            return self._text_states(ids)
        cached = self._text_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self._text_states(ids[:1]).detach()
            self._text_cache[key] = cached
        return cached.expand(ids.shape[0], *cached.shape[1:])

    def _text_states(self, ids: torch.Tensor, text_encoder=None) -> torch.Tensor:
        """The UNet's cross-attention states of ``ids``: the stage's ``text_states(text_encoder, ids)``
        where it has one (layer-wise tokens, ``methods.layerwise_tokens``), else the text encoder's
        last hidden states."""
        text_encoder = self.text_encoder if text_encoder is None else text_encoder
        states = getattr(self.stage, "text_states", None)
        return text_encoder(ids)[0] if states is None else states(text_encoder, ids)

    @staticmethod
    def _host_random(shape, dtype: torch.dtype, device: torch.device, fill) -> torch.Tensor:
        """Random numbers drawn from the CPU generator (``fill`` draws them in place into a host
        tensor, pinned when ``device`` is not the CPU), then copied asynchronously to ``device``:
        the same seed gives the same draws on CPU and GPU, so runs compare across devices, and no
        copy from pageable memory makes the host wait for the GPU to drain its queue."""
        host = fill(torch.empty(shape, dtype=dtype, pin_memory=device.type != "cpu"))
        return host if device.type == "cpu" else host.to(device, non_blocking=True)

    def _latents(self, batch: dict, prefix: str) -> torch.Tensor:
        if f"{prefix}_mean" in batch:  # cached VAE posterior: sample it
            mean, std = batch[f"{prefix}_mean"], batch[f"{prefix}_std"]
            eps = self._host_random(std.shape, std.dtype, std.device, torch.Tensor.normal_)
            return (mean + std * eps) * self.vae.config.scaling_factor
        with torch.no_grad():
            pixels = batch[f"{prefix}_pixels"].to(self.vae.dtype)
            return self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor

    def training_step(self, batch: dict, batch_idx: int):
        self._poll_pending()
        has_prior = "prior_input_ids" in batch
        latents = self._latents(batch, "instance")
        cond = self._text_states(batch["instance_input_ids"], self._fast.get("text_encoder", self.text_encoder))
        if has_prior:
            latents = torch.cat([latents, self._latents(batch, "prior")])
            cond = torch.cat([cond, self._prior_condition(batch).to(cond.dtype)])
        if self._fast.get("channels_last"):
            latents = latents.contiguous(memory_format=torch.channels_last)
        noise = self._host_random(latents.shape, latents.dtype, latents.device, torch.Tensor.normal_)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = self._host_random((latents.shape[0],), torch.long, latents.device, lambda h: h.random_(0, steps))  # = torch.randint
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        unet = self._fast.get("unet", self.unet)
        pred = unet(noisy, t, cond, return_dict=False)[0]
        target = noise if self.noise_scheduler.config.prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        n = batch["instance_input_ids"].shape[0]
        if has_prior:
            loss, concept_term, prior_term = prior_preservation_loss(pred[:n], target[:n], pred[n:], target[n:], self.prior_weight)
        else:
            loss = concept_term = torch.nn.functional.mse_loss(pred.float(), target.float())
            prior_term = torch.zeros((), device=loss.device)
        reg = self.stage.extra_loss(loss.device)  # the method's own term: L_reg (Eq. 7) for CNS
        if reg is None:
            reg = torch.zeros((), device=loss.device)
        total = loss + reg
        step = self.global_step
        if step % self.nan_check_every == 0:
            self._record_nonfinite(total, step)
        if self.logger is not None and step % self.log_every == 0:
            values = torch.stack([total.detach().float(), concept_term.detach().float(), prior_term.detach().float(), reg.detach().float()])
            self._send_to_host("metrics", step, values)
        return total

    # ------------------------------------------------ host sync-free checks and logs
    def _record_nonfinite(self, total: torch.Tensor, step: int) -> None:
        """Keep, on the device, the first step whose loss was NaN/inf; the host reads it later."""
        bad = ~torch.isfinite(total.detach())
        here = torch.full((), step, dtype=torch.long, device=total.device)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=total.device)
        self._first_bad = torch.where(bad & (self._first_bad < 0), here, self._first_bad)
        self._send_to_host("nan", step, torch.stack([self._first_bad.float(), total.detach().float()]))

    def _send_to_host(self, kind: str, step: int, values: torch.Tensor) -> None:
        if values.device.type == "cpu":
            self._pending.append((kind, step, None, values))
            self._poll_pending()
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((kind, step, event, host))

    def _poll_pending(self, wait: bool = False) -> None:
        """Handle the copies that have arrived (all of them with ``wait``): raise on a non-finite
        loss, hand metrics to the logger with their own step numbers."""
        while self._pending:
            kind, step, event, host = self._pending[0]
            if event is not None and not (wait or event.query()):
                return
            if event is not None:
                event.synchronize()
            self._pending.pop(0)
            if kind == "nan" and host[0] >= 0:
                self._pending.clear()
                key = self.stage.key if self.stage else "?"
                raise NonFiniteLossError(
                    f"training loss became non-finite at step {int(host[0])} of concept {key!r} "
                    f"(loss {float(host[1])} at step {step})"
                )
            if kind == "metrics" and self.logger is not None:
                total, diffusion, prior, reg = (float(v) for v in host)
                self.logger.log_metrics(
                    {"train/loss": total, "train/diffusion": diffusion, "train/prior": prior, "train/reg": reg},
                    step=self.step_offset + step,
                )

    def on_train_end(self) -> None:
        self._poll_pending(wait=True)  # one host sync per stage: the last NaN flags and metrics
        self._keep_on_device = True  # see cpu()

    def cpu(self):
        """Lightning's ``Strategy.teardown`` moves the module to the CPU after every ``fit``; the
        continual loop keeps one module on the GPU for all stages (selection, saving, evaluation and
        the next stage), so that one move after a completed fit is skipped. Any other call moves."""
        if getattr(self, "_keep_on_device", False):
            self._keep_on_device = False
            return self
        return super().cpu()
