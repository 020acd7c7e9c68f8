import os

import pytest
import torch

# Tests share one model cache so the embedded model is dequantized once per machine.
os.environ.setdefault("SAELAB_CACHE", os.path.expanduser("~/.cache/saelab"))
# Without a GPU, the Triton kernels run under Triton's interpreter on CPU tensors
# (tests/test_triton_kernels.py). Triton reads this when it is first imported, so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded default model in fp32 (slow tests only)."""
    from saelab.models.load import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="session")
def embedded_sae(embedded_lm, tmp_path_factory):
    """A TopK SAE trained here on the embedded model at resid_post.12 (20k builtin:stdlib
    tokens, ~1 min on 2 CPU threads): real features, unlike a random SAE's (slow tests only).
    Returns its folder; it read the first 20k tokens (157 contexts of 128) of the corpus."""
    from saelab.studies.saes import SAEPlan, ensure_saes

    plan = SAEPlan(sites=("resid_post.12",), arch="topk", width=1152, k=16, tokens=20_000,
                   corpus="builtin:stdlib", batch_size=512)
    return ensure_saes(embedded_lm, plan, tmp_path_factory.mktemp("embedded_sae"))["resid_post.12"]
