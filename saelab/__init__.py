"""saelab: sparse-autoencoder interpretability of language models, end to end.

The names a notebook needs, importable from here::

    import saelab
    lm = saelab.load_model("smollm2-135m-instruct", dtype="float32")
    sae = saelab.load_sae("runs/demo/saes/train/resid_post.12-batchtopk-4608-k32")
    ids, mask, keep = saelab.tokenize(lm, ["The river flows"])   # BOS first, specials masked
    with saelab.capture(lm.model, sae.cfg.site) as acts:
        acts.run(input_ids=ids, attention_mask=mask)

They are imported on first use (module `__getattr__`), so `import saelab` stays
fast and loads neither torch nor transformers; each is the same object as in
its home module (listed in `_EXPORTS`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> home module. One line per name; `__all__` is these keys.
_EXPORTS = {
    # models and sites
    "load_model": "saelab.models.load",
    "LM": "saelab.models.load",
    "capture": "saelab.models.hooks",
    "patch": "saelab.models.hooks",
    "resolve_sites": "saelab.models.sites",
    # text
    "tokenize": "saelab.data.tokens",
    "chat_prompt": "saelab.data.tokens",
    "load_corpus": "saelab.data.corpus",
    "pack": "saelab.data.tokens",
    # activations and training
    "harvest": "saelab.data.harvest",
    "HarvestConfig": "saelab.data.harvest",
    "ActivationStore": "saelab.data.store",
    "train_saes": "saelab.train.trainer",  # saelab.train is the subpackage; see _ALIASES
    "TrainConfig": "saelab.train.config",
    "SAESpec": "saelab.train.config",
    # SAEs
    "load_sae": "saelab.sae.formats",
    "save_sae": "saelab.sae.formats",
    "SAE": "saelab.sae.base",
    "load_transcoders": "saelab.sae.transcoder",
    "save_transcoders": "saelab.sae.transcoder",
    "Transcoder": "saelab.sae.transcoder",
    "TranscoderSet": "saelab.sae.transcoder",
    # evaluation
    "evaluate": "saelab.evals.run",
    "EvalConfig": "saelab.evals.run",
    "compare": "saelab.evals.dictionaries",
    # interventions
    "splice": "saelab.interventions.splice",
    "replace_mlps": "saelab.interventions.splice",
    "generate": "saelab.interventions.generate",
    "FeatureEdit": "saelab.interventions.edits",
    "SteerEdit": "saelab.interventions.edits",
    "PatchEdit": "saelab.interventions.edits",
    "steer_feature": "saelab.interventions.edits",
    # attribution
    "attribute": "saelab.attribution.attribute",
    "verify": "saelab.attribution.verify",
    "parse_metric": "saelab.attribution.metrics",
    # features
    "FeatureIndex": "saelab.features.index",
}

# Exported under another name than in their home module. `train` cannot be a name
# here: the import system binds the subpackage saelab.train on this module whenever
# it first loads, so a function of that name would be replaced (or would break
# `import saelab.train.trainer as t`).
_ALIASES = {"train_saes": "train"}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> object:
    home = _EXPORTS.get(name)
    if home is None:
        raise AttributeError(f"module 'saelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), _ALIASES.get(name, name))
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})

