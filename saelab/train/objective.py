"""One SAE being trained: its parameters, optimizer, loss and per-step upkeep.

Training happens on inputs scaled to unit mean squared norm (the scale is
measured on the first batch); `export()` folds the scale into the weights, so
saved SAEs take raw activations. Master weights are fp32; the large matmuls
run in the compute dtype (bf16 only where the hardware makes it pay).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.sae.base import SAE, SAEConfig, build_sae
from saelab.sae.jumprelu import JumpReLUFn, StepFn
from saelab.train import losses
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.distributed import SINGLE, Dist
from saelab.train.sparse_ops import SparseCodes, SparseDecode, SparseEncodeGrad, topk_codes

TOPK_FAMILY = ("topk", "batchtopk")


def default_lr(spec: SAESpec) -> float:
    if spec.arch in TOPK_FAMILY:
        # Gao et al. (2024)'s 1/sqrt(width) law (sparsify's default) times 8. The law was fitted
        # to runs of billions of tokens; at the millions a CPU trains on it under-trains: on
        # 1.84M resid_post.12 tokens of SmolLM2, held-out FVU 0.234 -> 0.144 (BatchTopK 4608)
        # and 0.200 -> 0.112 (TopK 9216) with no dead latents; x16 and x32 killed latents
        # (0.6%, 5.6%) for no gain. Reproduce: python -m bench.lr_sweep --cache DIR.
        return 8 * 2e-4 / math.sqrt(spec.width / 2**14)
    return {"relu": 7e-5, "jumprelu": 2e-4}[spec.arch]


class SAEObjective:
    """Parameters, Adam state and the loss of one SAE on one site."""

    def __init__(self, spec: SAESpec, d_in: int, cfg: TrainConfig, compute_dtype: torch.dtype,
                 metadata: dict, sync: Dist = SINGLE):
        self.spec, self.cfg, self.cdt, self.sync = spec, cfg, compute_dtype, sync
        gen = torch.Generator().manual_seed(cfg.seed + zlib_hash(spec.label))
        self.sae: SAE = build_sae(SAEConfig(
            spec.arch, d_in=d_in, d_sae=spec.width,
            k=spec.k if spec.arch in TOPK_FAMILY else None,
            apply_b_dec_to_input=spec.arch != "jumprelu", metadata=metadata), init=False)
        self.sae.reset_parameters_(generator=gen)
        self.sae.requires_grad_(False)
        params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        if spec.arch == "jumprelu":
            # θ itself is the parameter (clamped at 0), as SAELens does since 6.48: with
            # exp(log θ), Adam moves log θ by ~lr per step, so a CPU-length run (a few
            # thousand steps at lr 2e-4) could never take θ from 1e-3 to the ~0.05 the
            # pre-activations need on unit-norm inputs.
            self.threshold = torch.full((spec.width,), cfg.jumprelu_init_threshold)
            params.append(self.threshold)
        for p in params:
            p.requires_grad_(True)
        self.params = params
        beta1 = cfg.beta1 if cfg.beta1 is not None else (0.0 if spec.arch == "jumprelu" else 0.9)
        self.lr = cfg.lr or default_lr(spec)
        # The fused kernel: one pass per tensor instead of foreach's ~10 (16 vs 55 ms a
        # step for 576 x 9216 x 2 on 2 CPU cores). CPU and CUDA have it.
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        self.opt = torch.optim.Adam(params, lr=self.lr, betas=(beta1, cfg.beta2),
                                    fused=fused, foreach=None if fused else True)
        self.since_fired = torch.zeros(spec.width, dtype=torch.long)  # tokens since last firing
        self.fire_count = torch.zeros(spec.width, dtype=torch.float64)  # firings, whole run
        self.tokens_seen = torch.zeros((), dtype=torch.float64)
        self.scale = torch.zeros(())  # input scale; 0 until the first batch sets it
        self.batch_threshold = torch.zeros(())  # batchtopk: running inference threshold
        self.step_i = 0
        self._pre: Tensor | None = None  # the encoder's output buffer (see _encode_pre)

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to resume, as named tensors (optimizer state included)."""
        out = {f"p{i}": p.detach() for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    out[f"opt{i}.{key}"] = torch.as_tensor(st[key])
        out |= {"since_fired": self.since_fired, "fire_count": self.fire_count,
                "tokens_seen": self.tokens_seen, "scale": self.scale,
                "batch_threshold": self.batch_threshold, "step_i": torch.tensor(self.step_i)}
        return out

    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(t[f"p{i}"])
                if f"opt{i}.exp_avg" in t:
                    self.opt.state[p] = {k: t[f"opt{i}.{k}"].clone()
                                         for k in ("exp_avg", "exp_avg_sq", "step")}
        self.since_fired = t["since_fired"].clone()
        self.fire_count, self.tokens_seen = t["fire_count"].clone(), t["tokens_seen"].clone()
        self.scale, self.batch_threshold = t["scale"].clone(), t["batch_threshold"].clone()
        self.step_i = int(t["step_i"])

    @torch.no_grad()
    def init_from_batch(self, x: Tensor) -> None:
        """Measure the input scale and initialise b_dec from the first batch."""
        # Ranks hold equal shares of the global batch: the mean of their means is global.
        sq_norm = self.sync.mean_(x.pow(2).sum(-1).mean())
        self.scale = (1 / sq_norm.clamp_min(1e-12)).sqrt()
        xs = x * self.scale
        if self.cfg.b_dec_init == "mean":
            self.sae.b_dec.copy_(self.sync.mean_(xs.mean(0)))
        elif self.cfg.b_dec_init == "geometric_median":  # across ranks: the mean of medians
            self.sae.b_dec.copy_(self.sync.mean_(losses.geometric_median(xs)))

    # ------------------------------------------------------------------ step
    def train_step(self, x_raw: Tensor, steps: int) -> dict[str, float]:
        if self.scale == 0:
            self.init_from_batch(x_raw)
        x = x_raw * self.scale
        # a short run must not spend itself warming up: at most a tenth of it
        warmup = min(self.cfg.warmup_steps, max(1, steps // 10))
        lr = self.lr * losses.lr_factor(self.step_i, steps, warmup, self.cfg.decay_start)
        for group in self.opt.param_groups:
            group["lr"] = lr
        sparsity_w = losses.warmup_factor(self.step_i, steps, self.cfg.sparsity_warmup)
        if self.spec.arch in TOPK_FAMILY:
            loss, stats, fired = self._topk_loss(x)
        else:
            loss, stats, fired = self._dense_loss(x, sparsity_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.sync.active:
            for p in self.params:
                if p.grad is not None:
                    self.sync.mean_(p.grad)
        if self.spec.arch != "relu":  # unit-norm decoder rows: drop the radial gradient
            self.sae.remove_parallel_grad_()
        self.opt.step()
        if self.spec.arch != "relu":
            with torch.no_grad():
                self.sae.W_dec.div_(self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        counts = self.sync.sum_(torch.bincount(fired, minlength=self.spec.width).double())
        tokens = x.shape[0] * self.sync.world_size
        self.since_fired += tokens
        self.since_fired[counts > 0] = 0
        self.fire_count += counts
        self.tokens_seen += tokens
        self.step_i += 1
        stats |= {"loss": loss.item(), "lr": lr, "dead": self.dead_fraction()}
        return stats

    def log_sparsity(self) -> Tensor:
        """log10 firing frequency per feature over the run (SAELens' sparsity.safetensors)."""
        return (self.fire_count / self.tokens_seen.clamp_min(1) + 1e-10).log10().float()

    def dead_fraction(self) -> float:
        return (self.since_fired >= self.cfg.dead_tokens).float().mean().item()

    def _encode_pre(self, x: Tensor, subtract_b_dec: bool) -> tuple[Tensor, Tensor]:
        xc = x - self.sae.b_dec if subtract_b_dec else x
        # Stays in the compute dtype: top-k selects in it and only the k·N chosen values
        # become fp32 (in SparseEncodeGrad). Converting all of [N, F] to fp32 cost as
        # much as the bf16 matmul itself (43 vs 46 ms at 4096 x 576 -> 9216, 2 AMX cores).
        # Written into a buffer kept across steps: a fresh [N, F] tensor each step cost a
        # third of the matmul again (page faults on 75 MB; 49 vs 33 ms measured). Nothing
        # holds `pre` past the step (only gathered values and indices leave it).
        shape = (x.shape[0], self.spec.width)
        if self._pre is None or self._pre.shape != shape or self._pre.device != x.device:
            self._pre = torch.empty(shape, dtype=self.cdt, device=x.device)
        with torch.no_grad():  # the gradient is routed sparsely by SparseEncodeGrad
            pre = torch.addmm(self.sae.b_enc.to(self.cdt), xc.detach().to(self.cdt),
                              self.sae.W_enc.to(self.cdt), out=self._pre)  # (N, F)
        return xc, pre

    def _topk_loss(self, x: Tensor):
        sae, n = self.sae, x.shape[0]
        xc, pre = self._encode_pre(x, subtract_b_dec=True)
        if self.spec.arch == "batchtopk":
            rows, cols, top = sae.batch_topk(pre)
            kth = self.sync.mean_(top.min().float() if top.numel() else top.new_zeros((), dtype=torch.float32))
            # Inference threshold: EMA of the batch's k·N-th value over a ~10-step window,
            # short enough to track the encoder as it trains (a 0.99 EMA kept the early
            # steps' values and gave half the intended L0 after a short run).
            with torch.no_grad():
                m = 0.9 if self.batch_threshold > 0 else 0.0
                self.batch_threshold = m * self.batch_threshold + (1 - m) * kth
        else:
            rows, cols = topk_codes(pre, self.spec.k)
        codes = SparseCodes(rows, cols, pre.shape)
        vals = SparseEncodeGrad.apply(xc.detach(), sae.W_enc, sae.b_enc, pre, codes,
                                      sae.b_dec)
        x_hat = SparseDecode.apply(codes, vals, sae.W_dec) + sae.b_dec
        loss = losses.mse(x_hat, x)
        stats = {"mse": loss.item(), "fvu": losses.fvu(x_hat.detach(), x).item(),
                 "l0": rows.numel() / n}
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        if n_dead and self.cfg.auxk_alpha > 0:  # AuxK: dead latents explain the residual
            k_aux = min(x.shape[1] // 2, n_dead)
            masked = pre.masked_fill(~dead, -torch.inf)
            arows, acols = topk_codes(masked, k_aux)
            acodes = SparseCodes(arows, acols, pre.shape)
            avals = SparseEncodeGrad.apply(xc.detach(), sae.W_enc, sae.b_enc, pre, acodes,
                                           sae.b_dec)
            recon = SparseDecode.apply(acodes, avals, sae.W_dec)
            aux = losses.auxk((x - x_hat).detach(), recon)
            loss = loss + self.cfg.auxk_alpha * aux
            stats["auxk"] = aux.item()
        return loss, stats, cols

    def _dense_loss(self, x: Tensor, sparsity_w: float):
        sae = self.sae
        if self.spec.arch == "relu":
            pre = sae.pre_acts(x)
            feats = torch.relu(pre)
            penalty = self.spec.l1 * losses.l1_weighted(feats, sae.W_dec)
        else:
            pre = x @ sae.W_enc + sae.b_enc
            theta = self.threshold.clamp(min=0)
            eps = self.cfg.jumprelu_bandwidth
            feats = JumpReLUFn.apply(pre, theta, eps)
            penalty = self.spec.l0_coef * StepFn.apply(pre, theta, eps).sum(-1).mean()
        x_hat = feats @ sae.W_dec + sae.b_dec
        recon = losses.mse(x_hat, x)
        loss = recon + sparsity_w * penalty
        fired = (feats > 0).nonzero()[:, 1]  # one entry per firing
        stats = {"mse": recon.item(), "fvu": losses.fvu(x_hat.detach(), x).item(),
                 "l0": (feats > 0).sum(-1).float().mean().item(), "sparsity": penalty.item()}
        return loss, stats, fired

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, metadata: dict) -> SAE:
        """The trained SAE in fp32, taking raw activations (scale folded in)."""
        sae = build_sae(self.sae.cfg.with_metadata(**metadata), init=False)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(getattr(self.sae, name))
        if self.spec.arch == "jumprelu":
            sae._set_threshold_(self.threshold.clamp(min=0))
        if self.spec.arch == "batchtopk":
            sae.threshold.fill_(float(self.batch_threshold))
        sae.fold_scale_(self.scale)
        return sae.for_export()


def zlib_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())
