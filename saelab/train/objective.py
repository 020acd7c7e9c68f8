"""One SAE (or transcoder) being trained: its parameters, optimizer, loss and per-step upkeep.

A transcoder (`spec.target` set) reads its site and predicts the target site: its
batches are the two sites' rows joined ([N, d_in + d_out], see data/stream.py's
`pair_key`); input and target are scaled separately, b_dec is an output bias (never
subtracted from the input) and an optional affine skip adds ``x @ W_skip.T``. The
encoder reads the input minus its mean (measured on the first batch, fixed, folded into
b_enc at export), as an SAE's reads x - b_dec: on SmolLM2's mlp_in.6 an uncentred
top-k transcoder (4608, k 32) fell from L0 30 to 12 in 20 steps of 1,024 tokens (the
pre-activations of most features pushed below 0), centred it kept L0 32.

Training happens on inputs scaled to unit mean squared norm (the scale is
measured on the first batch); `export()` folds the scale into the weights, so
saved SAEs take raw activations. Master weights are fp32; the large matmuls
run in the compute dtype (bf16 only where the hardware makes it pay).

Everything lives on the objective's device (parameters, Adam state, counters,
thresholds, scratch buffers, the input scale), and a step never reads a value
back to the host: its statistics accumulate in a device tensor that the
trainer reads every `log_every` steps (`read_stats`). The few decisions that
would need a host value are taken without one: AuxK runs when the last read
found dead latents (masked to the ones dead now), inactive top-k slots are
masked to zero instead of removed, and BatchTopK picks the batch's k·N largest
from each token's 4k largest (a fixed-size selection, off the CPU; see `_batch_topk`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saelab.malloc import keep_freed_memory
from saelab.sae.base import SAE, SAEConfig, build_sae
from saelab.sae.jumprelu import JumpReLUFn, StepFn
from saelab.sae.transcoder import TranscoderConfig, build_transcoder
from saelab.train import losses
from saelab.train.config import SAESpec, TrainConfig
from saelab.train.distributed import SINGLE, Dist
from saelab.train.sparse_ops import SparseCodes, SparseDecode, SparseEncodeGrad, topk_codes_masked

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
BATCH_FAMILY = ("batchtopk", "matryoshka_batchtopk")  # one batch-level top-k
BATCHTOPK_CAP = 4  # a token holds at most this many times k of the batch's k·N codes
EXACT_BATCHTOPK_ON_CPU = True  # tests turn it off to check the device path on the CPU
STAT_KEYS = ("loss", "mse", "fvu", "l0", "auxk", "sparsity", "capped", "fvu_first")


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
                 metadata: dict, sync: Dist = SINGLE, device: str | torch.device = "cpu",
                 d_out: int | None = None, kernel: str = "torch"):
        self.spec, self.cfg, self.cdt, self.sync = spec, cfg, compute_dtype, sync
        self.kernel = kernel  # path of the sparse products: "torch" or "triton" (kernels.py)
        self.device = dev = torch.device(device)
        if dev.type == "cpu":  # each step's temporaries reused, not page-faulted in (malloc.py)
            keep_freed_memory()
        self.transcoder = spec.target is not None
        self.d_in, self.d_out = d_in, d_out or d_in
        # Initialised on the CPU from a CPU generator, then moved: the same initial
        # weights on every device, so CPU and CUDA runs can be compared.
        gen = torch.Generator().manual_seed(cfg.seed + zlib_hash(spec.label))
        k = spec.k if spec.arch in TOPK_FAMILY else None
        if self.transcoder:
            self.sae: SAE = build_transcoder(TranscoderConfig(
                spec.arch, d_in=d_in, d_sae=spec.width, d_out=self.d_out, k=k, skip=spec.skip,
                metadata=metadata), init=False)
        else:
            self.sae = build_sae(SAEConfig(
                spec.arch, d_in=d_in, d_sae=spec.width, k=k,
                apply_b_dec_to_input=spec.arch != "jumprelu",
                metadata=metadata | ({"matryoshka_widths": spec.matryoshka_widths}
                                     if spec.matryoshka_widths else {})), init=False)
        self.sae.reset_parameters_(generator=gen)
        self.sae = self.sae.to(dev)
        self.sae.requires_grad_(False)
        params = [self.sae.W_enc, self.sae.b_enc, self.sae.W_dec, self.sae.b_dec]
        names = ["W_enc", "b_enc", "W_dec", "b_dec"]
        if spec.arch == "jumprelu":
            # θ itself is the parameter (clamped at 0), as SAELens does since 6.48: with
            # exp(log θ), Adam moves log θ by ~lr per step, so a CPU-length run (a few
            # thousand steps at lr 2e-4) could never take θ from 1e-3 to the ~0.05 the
            # pre-activations need on unit-norm inputs.
            self.threshold = torch.full((spec.width,), cfg.jumprelu_init_threshold, device=dev)
            params.append(self.threshold)
            names.append("threshold")
        self.W_skip = getattr(self.sae, "W_skip", None)
        if self.W_skip is not None:
            params.append(self.W_skip)
            names.append("W_skip")
        self.W_enc_t: Tensor | None = None
        if spec.arch in TOPK_FAMILY:
            # The sparse backward makes W_enc's gradient as [F, D] rows (one per latent);
            # a row-major [D, F] W_enc takes it only through a transposed copy (7-20 ms a
            # step at 576 x 9216 on 2 CPU cores, more than the whole sparse backward). So
            # W_enc's storage is [F, D] rows (`W_enc_t`, which Adam steps: its fused kernel
            # is 4x slower on a strided tensor) and the SAE's W_enc is its transposed view,
            # where the gradient lands without a copy.
            self.W_enc_t = self.sae.W_enc.detach().T.contiguous()
            self.sae.W_enc.data = self.W_enc_t.T
            self.sae.W_enc.requires_grad_(True)
            params[0] = self.W_enc_t
        self.param_names = names
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
        self.since_fired = torch.zeros(spec.width, dtype=torch.long, device=dev)  # tokens since last firing
        self.fire_count = torch.zeros(spec.width, dtype=torch.float64, device=dev)  # firings, whole run
        self.tokens_seen = torch.zeros((), dtype=torch.float64, device=dev)
        self.scale = torch.zeros((), device=dev)  # input scale; set by the first batch
        self.scale_out = torch.zeros((), device=dev)  # a transcoder's target scale (likewise)
        self.center_in = torch.zeros(d_in, device=dev)  # a transcoder's input mean (likewise)
        self.batch_threshold = torch.zeros((), device=dev)  # batchtopk: running inference threshold
        self.step_i = 0
        self.initialized = False  # host flag: whether `scale` was measured (no read-back)
        self.exact_batchtopk = dev.type == "cpu" and EXACT_BATCHTOPK_ON_CPU  # see _batch_topk
        self.any_dead = False  # host flag: dead latents at the last read (turns AuxK on)
        self._stats = torch.zeros(len(STAT_KEYS), device=dev)  # sums since the last read
        self._stat_steps = 0
        self._lr = 0.0
        self._pre: Tensor | None = None  # the encoder's output buffer (see _encode_pre)

    @staticmethod
    def nbytes(spec: SAESpec, d_in: int, batch_size: int, compute_dtype: torch.dtype,
               d_out: int | None = None) -> int:
        """Device bytes one objective needs: fp32 weights, their gradients and Adam's two
        moments, counters, and the per-step scratch ([batch, width] encoder output in the
        compute dtype, plus what the loss keeps for backward). `d_out`: a transcoder's."""
        d_out = d_out or d_in
        n_params = (d_in + d_out) * spec.width + spec.width + d_out
        if spec.skip:
            n_params += d_in * d_out
        d_in = d_in + d_out if spec.target is not None else d_in  # a transcoder's joined rows
        if spec.arch == "jumprelu":
            n_params += spec.width
        weights = 4 * 4 * n_params  # param, grad, exp_avg, exp_avg_sq
        counters = spec.width * (8 + 8 + 8)
        item = torch.finfo(compute_dtype).bits // 8
        if spec.arch in TOPK_FAMILY:  # pre, the masked copy AuxK selects from, top-k scratch
            scratch = batch_size * spec.width * (2 * item + 4) + batch_size * d_in * 4 * 8
        else:  # dense autograd: pre, feats, their gradients and masks
            scratch = batch_size * spec.width * 4 * 6 + batch_size * d_in * 4 * 8
        return weights + counters + scratch

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor this objective holds (for tests and memory accounting)."""
        out = dict(zip(self.param_names, self.params, strict=True)) | {"W_enc": self.sae.W_enc}
        out |= {n: t for n, t in self.state_tensors().items() if n not in ("step_i", "any_dead")}
        out["stats"] = self._stats
        if self._pre is not None:
            out["pre"] = self._pre
        return out

    # ------------------------------------------------------------------ state
    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to resume, as named tensors (optimizer state included)."""
        out = {f"p{i}": self._saved(i, p.detach()) for i, p in enumerate(self.params)}
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    value = torch.as_tensor(st[key])
                    out[f"opt{i}.{key}"] = value if key == "step" else self._saved(i, value)
        out |= {"since_fired": self.since_fired, "fire_count": self.fire_count,
                "tokens_seen": self.tokens_seen, "scale": self.scale, "scale_out": self.scale_out,
                "center_in": self.center_in,
                "batch_threshold": self.batch_threshold, "step_i": torch.tensor(self.step_i),
                "any_dead": torch.tensor(self.any_dead)}
        return out

    def load_state_tensors(self, t: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(self._saved(i, t[f"p{i}"]))
                if f"opt{i}.exp_avg" in t:
                    # fused Adam keeps `step` on the parameters' device
                    self.opt.state[p] = {k: (self._saved(i, t[f"opt{i}.{k}"]) if k != "step"
                                             else t[f"opt{i}.{k}"]).to(
                                                 p.device, memory_format=torch.contiguous_format,
                                                 copy=True)
                                         for k in ("exp_avg", "exp_avg_sq", "step")}
        dev = self.device
        self.since_fired = t["since_fired"].to(dev, copy=True)
        self.fire_count, self.tokens_seen = t["fire_count"].to(dev, copy=True), t["tokens_seen"].to(dev, copy=True)
        self.scale, self.batch_threshold = t["scale"].to(dev, copy=True), t["batch_threshold"].to(dev, copy=True)
        if "scale_out" in t:
            self.scale_out = t["scale_out"].to(dev, copy=True)
        if "center_in" in t:
            self.center_in = t["center_in"].to(dev, copy=True)
        self.step_i = int(t["step_i"])
        self.initialized = bool(self.scale.item() > 0)
        self.any_dead = bool(t["any_dead"]) if "any_dead" in t else False

    def _saved(self, i: int, t: Tensor) -> Tensor:
        """Parameter i's tensors as saved ([d_in, width] for W_enc, as every checkpoint has
        it) from as held, or back: W_enc_t's are the transpose (a view either way)."""
        return t.T if i == 0 and self.W_enc_t is not None else t

    @torch.no_grad()
    def init_from_batch(self, x: Tensor, y: Tensor | None = None) -> None:
        """Measure the input scale (and a transcoder's target scale, from `y`) and
        initialise b_dec from the first batch's targets."""
        # Ranks hold equal shares of the global batch: the mean of their means is global.
        sq_norm = self.sync.mean_(x.float().pow(2).sum(-1).mean())
        self.scale = (1 / sq_norm.clamp_min(1e-12)).sqrt()
        if y is not None:
            sq_out = self.sync.mean_(y.float().pow(2).sum(-1).mean())
            self.scale_out = (1 / sq_out.clamp_min(1e-12)).sqrt()
            self.center_in = self.sync.mean_((x.float() * self.scale).mean(0))
        self.initialized = True
        xs = x * self.scale if y is None else y * self.scale_out
        if self.cfg.b_dec_init == "mean":
            self.sae.b_dec.copy_(self.sync.mean_(xs.mean(0)))
        elif self.cfg.b_dec_init == "geometric_median":  # across ranks: the mean of medians
            self.sae.b_dec.copy_(self.sync.mean_(losses.geometric_median(xs)))

    # ------------------------------------------------------------------ step
    def train_step(self, x_raw: Tensor, steps: int) -> None:
        """One optimizer step on a batch [N, d_in] (a transcoder's: [N, d_in + d_out],
        input and target joined) already on this objective's device.
        Nothing is read back to the host (see `read_stats`)."""
        y_raw = None
        if self.transcoder:
            x_raw, y_raw = x_raw[:, :self.d_in], x_raw[:, self.d_in:]
        if not self.initialized:
            self.init_from_batch(x_raw, y_raw)
        x = x_raw.float() * self.scale
        y = x if y_raw is None else y_raw.float() * self.scale_out
        x_skip = x
        if self.transcoder:  # the encoder reads the centred input (see the module docstring)
            x = x - self.center_in
        # a short run must not spend itself warming up: at most a tenth of it
        warmup = min(self.cfg.warmup_steps, max(1, steps // 10))
        lr = self.lr * losses.lr_factor(self.step_i, steps, warmup, self.cfg.decay_start)
        for group in self.opt.param_groups:
            group["lr"] = lr
        sparsity_w = losses.warmup_factor(self.step_i, steps, self.cfg.sparsity_warmup)
        if self.spec.arch in TOPK_FAMILY:
            loss, stats, counts = self._topk_loss(x, y, x_skip)
        else:
            loss, stats, counts = self._dense_loss(x, y, x_skip, sparsity_w)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.W_enc_t is not None:  # the same gradient seen as [F, D] rows: no copy
            self.W_enc_t.grad = self.sae.W_enc.grad.T
            self.sae.W_enc.grad = None
        if self.sync.active:
            for p in self.params:
                if p.grad is not None:
                    self.sync.mean_(p.grad)
        if self.spec.arch != "relu":  # unit-norm decoder rows: drop the radial gradient
            self.sae.remove_parallel_grad_()
        self.opt.step()
        with torch.no_grad():
            if self.spec.arch != "relu":
                self.sae.W_dec.div_(self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            counts = self.sync.sum_(counts)
            tokens = x.shape[0] * self.sync.world_size
            self.since_fired += tokens
            self.since_fired.masked_fill_(counts > 0, 0)
            self.fire_count += counts
            self.tokens_seen += tokens
            zero = loss.new_zeros(())
            self._stats += torch.stack([loss.detach().float()] + [
                stats.get(key, zero).detach().float() for key in STAT_KEYS[1:]])
        self._stat_steps += 1
        self._lr = lr
        self.step_i += 1

    def read_stats(self) -> dict[str, float]:
        """Means since the last read of loss, mse, fvu, l0 (and auxk, sparsity...), the
        learning rate and the dead fraction; the only host read-back of training. Also
        decides whether AuxK runs until the next read (when latents are dead)."""
        values = (self._stats / max(self._stat_steps, 1)).tolist()
        dead = self.dead_fraction()
        self.any_dead = dead > 0
        self._stats.zero_()
        self._stat_steps = 0
        keys = {"topk": ("mse", "fvu", "l0", "auxk"), "batchtopk": ("mse", "fvu", "l0", "auxk", "capped"),
                "matryoshka_batchtopk": ("mse", "fvu", "l0", "auxk", "capped", "fvu_first"),
                "relu": ("mse", "fvu", "l0", "sparsity"), "jumprelu": ("mse", "fvu", "l0", "sparsity")}
        named = dict(zip(STAT_KEYS, values, strict=True))
        return {k: named[k] for k in keys[self.spec.arch]} | {
            "loss": named["loss"], "lr": self._lr, "dead": dead}

    def log_sparsity(self) -> Tensor:
        """log10 firing frequency per feature over the run (SAELens' sparsity.safetensors)."""
        return (self.fire_count / self.tokens_seen.clamp_min(1) + 1e-10).log10().float().cpu()

    def dead_fraction(self) -> float:
        """Fraction of latents silent for `dead_tokens` tokens (a host read-back)."""
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

    def _batch_topk(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The batch's k·N largest pre-activations as fixed-size (rows, cols, keep), and the
        fraction of tokens that filled their cap.

        A fixed-size selection needs no host read-back (the exact candidate set of
        sae.batch_topk has a data-dependent size): each token offers its 4k largest,
        and the k·N largest of those N·4k win. That equals BatchTopK unless a token
        would hold more than 4k codes; `capped` (in the stats) counts the tokens whose
        every candidate won, the only ones that could have lost a code to the cap.
        On the CPU a read-back costs nothing (no device queue to drain) and the exact
        selection is faster there (576 vs 824 ms at 4096 x 4608, k 32, 2 loaded
        cores: the per-token top-4k costs more than its nonzero), so it is kept.
        """
        n, width = pre.shape
        if self.exact_batchtopk:
            rows, cols, _ = self.sae.batch_topk(pre)
            return rows, cols, torch.ones_like(rows, dtype=torch.bool), pre.new_zeros(
                (), dtype=torch.float32)
        cap = min(width, BATCHTOPK_CAP * self.spec.k)
        cand_vals, cand_cols = pre.topk(cap, dim=-1, sorted=False)  # (N, cap)
        win = cand_vals.reshape(-1).topk(self.spec.k * n, sorted=False).indices
        win = win.sort().values  # rows ascending, as SparseCodes needs
        rows = win // cap
        cols = cand_cols.reshape(-1)[win]
        keep = cand_vals.reshape(-1)[win] > 0  # ReLU: a non-positive winner is inactive
        if cap < width:
            per_row = torch.zeros(n, device=pre.device).index_add_(0, rows, keep.float())
            capped = (per_row >= cap).float().mean()
        else:
            capped = pre.new_zeros((), dtype=torch.float32)
        return rows, cols, keep, capped

    def _skip(self, x: Tensor) -> Tensor | float:
        """A skip transcoder's ``x @ W_skip.T`` (0 without a skip)."""
        return x @ self.W_skip.T if self.W_skip is not None else 0.0

    def _topk_loss(self, x: Tensor, y: Tensor, x_skip: Tensor):
        sae, n = self.sae, x.shape[0]
        b_dec_in = None if self.transcoder else sae.b_dec  # a transcoder's b_dec is output-side
        xc, pre = self._encode_pre(x, subtract_b_dec=not self.transcoder)
        stats = {}
        if self.spec.arch in BATCH_FAMILY:
            rows, cols, keep, stats["capped"] = self._batch_topk(pre)
            with torch.no_grad():
                vals = pre.reshape(-1)[rows * pre.shape[1] + cols].float()
                kth = torch.where(keep, vals, torch.inf).min()
                kth = self.sync.mean_(torch.where(keep.any(), kth, 0.0))
                # Inference threshold: EMA of the batch's k·N-th value over a ~10-step
                # window, short enough to track the encoder as it trains (a 0.99 EMA kept
                # the early steps' values and gave half the intended L0 after a short run).
                bt = self.batch_threshold
                self.batch_threshold = torch.where(bt > 0, 0.9 * bt + 0.1 * kth, kth)
        else:
            rows, cols, keep = topk_codes_masked(pre, self.spec.k)
        codes = SparseCodes(rows, cols, pre.shape, check=False, kernel=self.kernel)
        keep_f = keep.to(torch.float32)
        vals = SparseEncodeGrad.apply(xc.detach(), sae.W_enc, sae.b_enc, pre, codes,
                                      b_dec_in) * keep_f
        x_hat = SparseDecode.apply(codes, vals, sae.W_dec) + sae.b_dec
        if self.W_skip is not None:
            x_hat = x_hat + self._skip(x_skip)
        loss = losses.mse(x_hat, y)
        # FVU from the MSE: the residual's passes over [N, d] are not made twice
        stats |= {"mse": loss, "fvu": losses.fvu_from_mse(loss.detach(), y),
                  "l0": keep_f.sum() / n}
        if self.spec.matryoshka_widths:
            loss, stats["fvu_first"] = self._matryoshka_loss(codes, cols, vals, y, loss)
        if self.any_dead and self.cfg.auxk_alpha > 0:  # AuxK: dead latents explain the residual
            dead = self.since_fired >= self.cfg.dead_tokens
            # k_aux = min(d_in / 2, dead latents), as a fixed-size top-k over the dead ones
            # (the live ones masked to -inf, so they never win: `akeep` drops them)
            k_aux = min(y.shape[1] // 2, self.spec.width)
            masked = pre.masked_fill(~dead, -torch.inf)
            arows, acols, akeep = topk_codes_masked(masked, k_aux)
            acodes = SparseCodes(arows, acols, pre.shape, check=False,
                                 kernel=self.kernel)
            avals = SparseEncodeGrad.apply(xc.detach(), sae.W_enc, sae.b_enc, pre, acodes,
                                           b_dec_in) * akeep.to(torch.float32)
            recon = SparseDecode.apply(acodes, avals, sae.W_dec)
            aux = losses.auxk((y - x_hat).detach(), recon) * dead.any()
            loss = loss + self.cfg.auxk_alpha * aux
            stats["auxk"] = aux
        counts = torch.zeros(self.spec.width, dtype=torch.float64, device=x.device)
        counts.index_add_(0, cols, keep.to(torch.float64))
        return loss, stats, counts

    def _matryoshka_loss(self, codes: SparseCodes, cols: Tensor, vals: Tensor, x: Tensor,
                         full_mse: Tensor) -> tuple[Tensor, Tensor]:
        """Mean over the nested prefixes [0, w) of their reconstruction MSE (the last prefix
        is the whole SAE, whose MSE is `full_mse`), and the first prefix's FVU.

        Equal weights per level, as dictionary_learning's default; each prefix decodes
        only its own codes (the others masked to 0), so a level costs one sparse decode."""
        widths = self.spec.matryoshka_widths
        total, first = full_mse, None
        for w in widths[:-1]:
            x_hat_w = SparseDecode.apply(codes, vals * (cols < w), self.sae.W_dec) + self.sae.b_dec
            total = total + losses.mse(x_hat_w, x)
            if first is None:
                first = losses.fvu(x_hat_w.detach(), x)
        return total / len(widths), first if first is not None else full_mse.new_zeros(())

    def _dense_loss(self, x: Tensor, y: Tensor, x_skip: Tensor, sparsity_w: float):
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
            l0 = StepFn.apply(pre, theta, eps).sum(-1).mean()
            if self.spec.target_l0:  # a target L0: pulled to it from above and below
                penalty = self.spec.l0_coef * (l0 / self.spec.target_l0 - 1).pow(2)
            else:
                penalty = self.spec.l0_coef * l0
        x_hat = feats @ sae.W_dec + sae.b_dec + self._skip(x_skip)
        recon = losses.mse(x_hat, y)
        loss = recon + sparsity_w * penalty
        active = (feats.detach() > 0)
        counts = active.sum(0).double()  # firings per latent
        stats = {"mse": recon, "fvu": losses.fvu(x_hat.detach(), y),
                 "l0": active.sum(-1).float().mean(), "sparsity": penalty}
        return loss, stats, counts

    # ------------------------------------------------------------------ export
    @torch.no_grad()
    def export(self, metadata: dict) -> SAE:
        """The trained SAE (or transcoder) in fp32, taking raw activations (scales folded in)."""
        cfg = self.sae.cfg.with_metadata(**metadata)
        sae = build_transcoder(cfg, init=False) if self.transcoder else build_sae(cfg, init=False)
        names = ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if self.spec.skip else ())
        for name in names:
            getattr(sae, name).copy_(getattr(self.sae, name).cpu())
        if self.spec.arch == "jumprelu":
            sae._set_threshold_(self.threshold.clamp(min=0).cpu())
        if self.spec.arch in BATCH_FAMILY:
            sae.threshold.fill_(float(self.batch_threshold))
        if self.transcoder:  # (x - c) @ W_enc + b_enc = x @ W_enc + (b_enc - c @ W_enc)
            sae.b_enc.sub_(self.center_in.cpu() @ sae.W_enc)
            sae.fold_scale_(self.scale.cpu(), self.scale_out.cpu())
        else:
            sae.fold_scale_(self.scale.cpu())
        return sae.for_export()


def zlib_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode())
