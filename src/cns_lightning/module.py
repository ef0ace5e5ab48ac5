"""The LightningModule: an SD UNet + text encoder with per-concept mask buffers.

One module lives through the whole continual sequence (one model holds every concept). Before
each stage the loop calls ``begin_stage`` with the concept's masks and token; ``Trainer.fit``
then trains only those K/V entries and that token row; ``end_stage`` removes the hooks.

Speed (GPU): ``MaskedAdam`` keeps optimizer state only for the masked entries; the prior prompt's
text embedding (none of its tokens train) is computed once per stage; the NaN check and the
logged metrics travel to the host asynchronously (no per-step host sync); ``enable_speedups``
(``speedups.SpeedUps`` callback) adds ``torch.compile`` and channels-last. See docs/benchmarks.md.
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import DDPMScheduler

from .losses import overlap_masks, prior_preservation_loss, regularization_loss
from .masking import MaskedAdam, flat_indices, row_mask
from .models import cross_attention_kv


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
        cache_prior_text: bool = True,
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
        self.cache_prior_text = bool(cache_prior_text)
        self._stage: dict | None = None
        self._fast: dict = {}  # compiled callables (kept out of the module tree and the state_dict)
        self._text_cache: dict[bytes, torch.Tensor] = {}
        self._pending: list = []  # (kind, step, event, host tensor): async NaN flags and metrics
        self._first_bad: torch.Tensor | None = None

    # --------------------------------------------------------------- speed-ups
    def enable_speedups(self, compile: bool | dict = False, channels_last: bool = False) -> None:
        """Channels-last UNet weights and/or a ``torch.compile``d UNet and text encoder for training
        steps only.

        Generation (prior images, evaluation), selection and the cached prior-prompt embeddings keep
        calling the plain modules, so they never trigger a recompile; the compiled callables share
        the same parameters.
        """
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self._fast["channels_last"] = True
        if compile and "unet" not in self._fast:
            kwargs = {str(k): v for k, v in compile.items()} if hasattr(compile, "items") else {}  # dict or DictConfig
            kwargs.setdefault("dynamic", False)
            self._fast["unet"] = torch.compile(self.unet, **kwargs)
            # The instance prompts' text encoder forward and backward (the new token trains through
            # all its layers): eager, it is hundreds of small kernels and most of a step's host time.
            self._fast["text_encoder"] = torch.compile(self.text_encoder, **kwargs)

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
        trainable_kv: dict[str, torch.nn.Parameter] = {}
        for name, p in kv.items():
            if train_kv and bool(masks[name].any()):
                p.requires_grad_(True)
                trainable_kv[name] = p
        embeddings.requires_grad_(True)
        overlap = {n: m for n, m in overlap_masks(masks, [self.concept_masks(k) for k in earlier]).items() if n in trainable_kv}
        initial = self.kv_initial()
        with torch.no_grad():
            # Eq. 7 only looks at the entries of M: keep their flat indices and W_{m-1}, W_0 there
            # (W_{m-1} = the weights now, at the start of stage m).
            overlap_idx = {n: flat_indices(m, m.shape) for n, m in overlap.items()}
            previous_c = {n: trainable_kv[n].detach().view(-1)[i] for n, i in overlap_idx.items()}
            initial_c = {n: initial[n].view(-1)[i] for n, i in overlap_idx.items()}
        self._stage = dict(
            key=key, token_ids=list(token_ids), trainable_kv=trainable_kv, embeddings=embeddings,
            kv_masks={n: masks[n] for n in trainable_kv}, token_mask=row_mask(embeddings.shape[0], token_ids, embeddings.device),
            overlap=overlap, overlap_idx=overlap_idx, previous_c=previous_c, initial_c=initial_c,
            optimizer=None, reg=None,
        )
        self._text_cache.clear()
        self._pending.clear()
        self._first_bad = None

    def end_stage(self) -> None:
        if self._stage is None:
            return
        for p in self.kv().values():
            p.requires_grad_(False)
        self.text_encoder.get_input_embeddings().weight.requires_grad_(False)
        self._stage = None

    # --------------------------------------------------------------- training
    def configure_optimizers(self):
        if self._stage is None:
            raise RuntimeError("begin_stage() must be called before Trainer.fit")
        stage = self._stage
        groups = []
        if stage["trainable_kv"]:
            pairs = [(p, stage["kv_masks"][n]) for n, p in stage["trainable_kv"].items()]
            groups.append({"params": pairs, "lr": self.hp["lr_neurons"], "name": "neurons"})
        groups.append({"params": [(stage["embeddings"], stage["token_mask"])], "lr": self.hp["lr_token"], "name": "token"})
        # Adam over the masked entries only (no weight decay: nothing outside the masks may move).
        opt = MaskedAdam(groups, betas=self.hp["betas"], eps=self.hp["eps"])
        stage["optimizer"] = opt
        stage["reg"] = None
        if stage["overlap_idx"]:
            # Eq. 7 needs only the entries of M: a subset of the compact vector of the "neurons" group.
            names = list(stage["overlap_idx"])
            stage["reg"] = dict(
                pos=torch.cat([opt.positions(0, stage["trainable_kv"][n], stage["overlap"][n]) for n in names]),
                previous=torch.cat([stage["previous_c"][n].float() for n in names]),
                initial=torch.cat([stage["initial_c"][n].float() for n in names]),
                grad=None,
            )
        return opt

    def _regularization(self, device) -> torch.Tensor:
        """L_reg (Eq. 7) on the entries of M, read from the optimizer's compact vector (the same
        values as the weights there). Its gradient is computed here, on that short vector, and added
        to the compact gradient in ``on_after_backward``: a handful of kernels instead of a gather,
        two norms and a scatter per layer."""
        stage = self._stage
        reg_state = stage.get("reg")
        if reg_state is None:  # no optimizer yet (training_step called by hand): per-layer form
            kv = stage["trainable_kv"]
            current = {n: kv[n].view(-1)[i] for n, i in stage["overlap_idx"].items()}
            every = {n: torch.ones((), dtype=torch.bool, device=device) for n in current}
            return regularization_loss(current, stage["previous_c"], stage["initial_c"], every, self.hp["lambda1"], self.hp["lambda2"])
        compact = stage["optimizer"].param_groups[0]["params"][0]
        with torch.enable_grad():
            c = compact.detach()[reg_state["pos"]].requires_grad_(True)
            one = {"M": torch.ones((), dtype=torch.bool, device=device)}
            reg = regularization_loss({"M": c}, {"M": reg_state["previous"]}, {"M": reg_state["initial"]}, one, self.hp["lambda1"], self.hp["lambda2"])
            reg_state["grad"] = torch.autograd.grad(reg, c)[0] if reg.requires_grad else None
        return reg.detach()

    def on_after_backward(self) -> None:
        opt = self._stage["optimizer"] if self._stage else None
        if opt is not None:
            opt.gather_grads()  # gradient clipping / grad-norm callbacks then see the compact grads
            reg_state = self._stage.get("reg")
            if reg_state is not None and reg_state["grad"] is not None:
                # Lightning divides each micro-batch's loss by accumulate_grad_batches: so does L_reg's
                # gradient, which then enters an optimizer step once whatever the accumulation.
                micro = self._trainer.accumulate_grad_batches if self._trainer is not None else 1
                opt.param_groups[0]["params"][0].grad.index_add_(0, reg_state["pos"], reg_state["grad"], alpha=1.0 / micro)
                reg_state["grad"] = None

    def on_fit_start(self) -> None:
        # DDP: every rank starts from the same seed; give each its own noise, timesteps and flips.
        if self.trainer is not None and self.trainer.world_size > 1:
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.trainer.global_rank)

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Mark a batch whose prior prompts are one prompt with no trainable token (still on the CPU,
        so no host sync): its text embedding is computed once per stage (``_prior_condition``)."""
        ids = batch.get("prior_input_ids") if isinstance(batch, dict) else None
        if not self.cache_prior_text or self._stage is None or ids is None or ids.device.type != "cpu":
            return batch
        first = ids[:1]
        trainable = torch.tensor(self._stage["token_ids"], dtype=ids.dtype)
        if bool((ids == first).all()) and not bool(torch.isin(first, trainable).any()):
            batch["prior_text_key"] = first.numpy().tobytes()
        return batch

    def _prior_condition(self, batch: dict) -> torch.Tensor:
        ids = batch["prior_input_ids"]
        key = batch.get("prior_text_key")
        if key is None:
            return self.text_encoder(ids)[0]
        cached = self._text_cache.get(key)
        if cached is None:
            with torch.no_grad():
                cached = self.text_encoder(ids[:1])[0].detach()
            self._text_cache[key] = cached
        return cached.expand(ids.shape[0], *cached.shape[1:])

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
        cond = self._fast.get("text_encoder", self.text_encoder)(batch["instance_input_ids"])[0]
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
            loss, concept_term, prior_term = prior_preservation_loss(pred[:n], target[:n], pred[n:], target[n:], self.hp["prior_weight"])
        else:
            loss = concept_term = torch.nn.functional.mse_loss(pred.float(), target.float())
            prior_term = torch.zeros((), device=loss.device)
        reg = torch.zeros((), device=loss.device)
        stage = self._stage
        if stage["overlap_idx"]:
            reg = self._regularization(loss.device)  # Eq. 7 on the entries of M only (zero elsewhere)
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
                key = self._stage["key"] if self._stage else "?"
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
