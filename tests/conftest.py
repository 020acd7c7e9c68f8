import os

import pytest

# Tests share one model cache so the embedded model is dequantized once per machine.
os.environ.setdefault("SAELAB_CACHE", os.path.expanduser("~/.cache/saelab"))


@pytest.fixture(scope="session")
def embedded_lm():
    """The embedded default model in fp32 (slow tests only)."""
    from saelab.models.load import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")
