"""PatchMLPs: the MLP's own input of this forward reaches the output patch; hooks always go."""

import pytest
import torch
from tiny_models import tiny_model

from saelab.interventions.mlp_patch import PatchMLPs
from saelab.models.hooks import capture
from saelab.models.sites import describe


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_output_is_rewritten_from_this_forwards_input_and_none_leaves_it_alone():
    model, ids = tiny_model("llama"), torch.randint(3, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    arch = describe(model)
    with torch.no_grad():
        clean = _logits(model, ids)
        with capture(model, "mlp_in.1,mlp_out.1") as acts:
            acts.run(input_ids=ids)
        seen = {}

        def keep(x, y, ctx):
            seen["x"], seen["y"] = x, y
            return None

        with PatchMLPs(model, arch, {1: ("mlp_in.1", keep)}) as p:
            assert torch.equal(_logits(model, ids), clean)  # None: bit-identical
            assert not p._inputs  # the stash is popped by the output patch
        assert torch.equal(seen["x"], acts["mlp_in.1"]) and torch.equal(seen["y"], acts["mlp_out.1"])
        zero = {1: ("mlp_in.1", lambda x, y, ctx: torch.zeros_like(y))}  # the output becomes fn's
        with capture(model, "mlp_out.1", stop_early=False) as inner, PatchMLPs(model, arch, zero):
            zeroed = _logits(model, ids)
    assert not torch.equal(zeroed, clean) and not inner["mlp_out.1"].any()
    assert _hook_count(model) == 0


def test_hooks_and_stash_go_on_exit_and_on_an_exception():
    model, ids = tiny_model("llama"), torch.randint(3, 60, (1, 5), generator=torch.Generator().manual_seed(1))
    arch, before = describe(model), _hook_count(model)

    def boom(x, y, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), PatchMLPs(model, arch, {0: ("mlp_in.0", boom)}) as p:
        assert _hook_count(model) > before
        _logits(model, ids)
    assert _hook_count(model) == before and not p._inputs
    with PatchMLPs(model, arch, {}):  # nothing to patch: nothing installed
        assert _hook_count(model) == before
