"""The live half of the browser: prompt search, steering and token ablation with the model.

Imported by the server on the first live request, so that the browser starts
without torch. One `Live` per server loads the model once (lazily) and each SAE
on first use; a lock runs one model call at a time (a 2-core CPU gains nothing
from two at once, and it keeps memory flat).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from saelab.data.tokens import context_bos_id, encode_prompts
from saelab.features.index import FeatureIndex
from saelab.interventions.edits import FeatureEdit, steer_feature
from saelab.interventions.generate import generate
from saelab.interventions.strength import activation_value, site_norm
from saelab.models.hooks import capture


class LiveError(Exception):
    """A live request that cannot be served (missing SAE weights, model not loadable)."""

    status = 409


class PromptTooLongError(LiveError):
    """A prompt over the live pages' token limit: 413, as one over the character limit."""

    status = 413


class Live:
    def __init__(self, device: str = "cpu"):
        self.device = device
        self.lock = threading.Lock()
        self._lm: dict[str, Any] = {}
        self._saes: dict[str, Any] = {}
        self._norms: dict[tuple[str, str], float] = {}  # (model, site) -> site norm

    # Callers load the SAE before the model: a missing SAE folder then fails fast.
    def lm(self, name: str):
        if name not in self._lm:
            from saelab.models.load import load_model

            try:
                self._lm[name] = load_model(name, dtype="float32", device=self.device)
            except Exception as err:  # any loading failure becomes a clear message
                raise LiveError(f"could not load the model {name!r} for live pages: {err}") from err
        return self._lm[name]

    def sae(self, key: str, index: FeatureIndex):
        if key not in self._saes:
            from saelab.sae import load_sae

            info = index.meta["sae"]
            candidates = [info.get("path")]
            if info.get("relpath"):
                candidates.append(str((index.folder / info["relpath"]).resolve()))
            path = next((p for p in candidates if p and Path(p).exists()), None)
            if path is None:
                raise LiveError(f"the weights of SAE {key!r} are not at {info.get('path')} any "
                                "more; live pages need them (the index pages still work).")
            self._saes[key] = load_sae(path, dtype="float32").eval().to(self.device)
        return self._saes[key]

    # ------------------------------------------------------------- prompt search
    @torch.inference_mode()
    def search(self, key: str, index: FeatureIndex, text: str, *, top: int = 5,
               max_tokens: int = 256) -> dict:
        """Which features fire on which tokens of `text`: top per token and overall."""
        with self.lock:
            sae, lm = self.sae(key, index), self.lm(index.meta["model"]["name"])
            ids, _ = encode_prompts(lm.tokenizer, [text])
            bos = context_bos_id(lm.tokenizer)
            if bos is not None and int(ids[0, 0]) != bos:
                # As every collected context does: position 0 is an attention sink with a
                # huge norm, so a special token sits there, never the first word.
                ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
            if ids.shape[1] > max_tokens:
                raise PromptTooLongError(f"the prompt has {ids.shape[1]} tokens; at most {max_tokens}")
            site = sae.cfg.site
            with capture(lm.model, site, arch=lm.arch) as cap:
                cap.run(input_ids=ids.to(lm.device))
            feats = sae.encode(cap[site][0].float()).cpu()  # (P, F)
        special = set(lm.tokenizer.all_special_ids)
        token_ids = ids[0].tolist()
        k = min(top, feats.shape[1])
        vals, idx = feats.topk(k, dim=1)
        tokens = []
        for p, tok in enumerate(token_ids):
            fired = [{"feature": int(i), "act": float(v)} for v, i in zip(vals[p], idx[p], strict=True)
                     if v > 0]
            tokens.append({"token": lm.tokenizer.decode([tok]), "id": tok,
                           "special": tok in special, "features": fired})
        counted = torch.tensor([t not in special for t in token_ids])
        per_feature = feats[counted].max(dim=0) if counted.any() else None
        overall = []
        if per_feature is not None:
            best, where = per_feature.values, counted.nonzero().squeeze(1)[per_feature.indices]
            ov, oi = best.topk(min(max(top, 10), len(best)))
            overall = [{"feature": int(i), "max_act": float(v), "position": int(where[i]),
                        "n_tokens": int((feats[:, i] > 0).sum())}
                       for v, i in zip(ov, oi, strict=True) if v > 0]
        return {"tokens": tokens, "overall": overall}

    # ------------------------------------------------------------- steering
    def steer(self, key: str, index: FeatureIndex, *, prompt: str, feature: int, mode: str,
              strength: float, max_new_tokens: int, seed: int, temperature: float,
              chat: bool) -> dict:
        """Unsteered and steered generations of `prompt` from the same seed, in one batch.

        `strength` is in site norms (saelab.interventions.strength): add s adds a vector
        of norm s*N along the feature's decoder direction, clamp s holds the feature where
        its decoded part has norm s*N, N being the site's mean activation norm.
        """
        with self.lock:
            sae = self.sae(key, index)
        return self.steer_sae(sae, index.meta["model"]["name"], prompt=prompt, feature=feature,
                              mode=mode, strength=strength, max_new_tokens=max_new_tokens,
                              seed=seed, temperature=temperature, chat=chat)

    def steer_sae(self, sae: Any, name: str, *, prompt: str, feature: int, mode: str,
                  strength: float, max_new_tokens: int, seed: int, temperature: float,
                  chat: bool) -> dict:
        """`steer` with a loaded SAE on the model `name` (a scope's SAEs have no index)."""
        with self.lock:
            lm = self.lm(name)
            if chat and not getattr(lm.tokenizer, "chat_template", None):
                raise ValueError("this model's tokenizer has no chat template; untick chat")
            site = sae.cfg.site
            if (name, site) not in self._norms:
                self._norms[name, site] = site_norm(lm, site)
            norm = self._norms[name, site]
            value = activation_value(sae, feature, strength, norm)
            if mode == "add":  # x += value * W_dec[f] at the site, no SAE in the forward
                edits, saes = [steer_feature(sae, feature, value, rows=[1])], None
            else:  # clamp the feature's activation through the spliced SAE (error term kept)
                edits, saes = [FeatureEdit(feature, "set", value, rows=[1])], sae
            out = generate(lm, [prompt, prompt], seeds=[seed, seed], edits=edits, saes=saes,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.9,
                           chat=chat)
        plain, steered = out.samples
        return {"unsteered": plain.text, "steered": steered.text,
                "stop": [plain.stop, steered.stop], "seed": seed, "site_norm": norm,
                "activation": value}

    # ------------------------------------------------------------- token ablation
    def ablation(self, key: str, index: FeatureIndex, feature: int, examples: list[dict],
                 context: list[int] | None, max_back: int = 16) -> list[dict]:
        """Ablated text of `examples` (the top one first, then uniform ones) by the shared path
        (features/ablated_text.py); rows as ablation.parquet's.

        The top example runs in its whole context when the index has it (`top_context`);
        the others in their window alone (the index keeps no other context), with the
        window's first token as the context's start.
        """
        import numpy as np

        from saelab.features.ablated_text import ablate_examples, as_arrays, window_rows

        ex = as_arrays(examples)
        whole = [bool(context) and e["kind"] == "top" and e["rank"] == 0 for e in examples]
        ids = [context if w else e["token_ids"] for e, w in zip(examples, whole, strict=True)]
        shift = np.array([0 if w else e["start"] for e, w in zip(examples, whole, strict=True)])
        local = ex | {"position": ex["position"] - shift, "start": ex["start"] - shift}
        with self.lock:
            sae, lm = self.sae(key, index), self.lm(index.meta["model"]["name"])
            specials = set(lm.tokenizer.all_special_ids)
            results = ablate_examples(lm, sae, local, ids, [[t in specials for t in r] for r in ids],
                                      max_back=max_back)
        rows = window_rows(local, results) | {"position": ex["position"], "start": ex["start"]}
        out = []
        for i, e in enumerate(examples):
            row = {k: (v[i].tolist() if hasattr(v[i], "tolist") else v[i]) for k, v in rows.items()}
            row |= {"kind": e["kind"], "tokens": e["tokens"], "whole_context": whole[i]}
            out.append(row)
        return out
