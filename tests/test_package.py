"""The top-level names (`import saelab`), the public tokenizer, and the import graph."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_tokens import _smol, smol, word  # noqa: F401 (fixtures)

import saelab
from saelab.data.tokens import tokenize

ROOT = Path(saelab.__file__).parent


def test_import_saelab_is_light_and_exports_everything():
    code = ("import sys, saelab; heavy = [m for m in ('torch', 'transformers', 'numpy') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in saelab.__all__:
        value = getattr(saelab, name)
        if name in saelab._EXPORTS:
            home = importlib.import_module(saelab._EXPORTS[name])
            assert value is getattr(home, saelab._ALIASES.get(name, name)), name
    assert saelab.tokenize is tokenize
    assert {"load_model", "load_sae", "capture", "patch", "splice", "generate", "attribute",
            "train_saes", "harvest", "evaluate", "tokenize"} <= set(saelab.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        saelab.nope  # noqa: B018


def test_exports_never_shadow_a_subpackage():
    """The import system binds saelab.X to the subpackage X when it loads, so an export
    named like a subpackage (`train`) would silently change under the user."""
    subpackages = {m.name for m in pkgutil.iter_modules([str(ROOT)])}
    assert not subpackages & set(saelab.__all__)
    import saelab.train.trainer as trainer  # still importable after the exports resolved

    assert saelab.train_saes is trainer.train


def test_tokenize_puts_bos_first_and_masks_specials(smol, word):  # noqa: F811
    bos = smol.bos_token_id
    assert smol("The river flows").input_ids[0] != bos  # SmolLM2 does not add it itself
    ids, mask, keep = tokenize(smol, ["The river flows", "Hi"])
    n = len(smol("The river flows").input_ids)
    assert ids[:, 0].tolist() == [bos, bos] and ids.shape == (2, n + 1)
    assert ids[0, 1:].tolist() == smol("The river flows").input_ids
    assert mask.tolist()[1] == [1] * (1 + len(smol("Hi").input_ids)) + [0] * (n - 1)
    # BOS and padding are never kept; every text token is.
    assert keep.tolist()[0] == [False] + [True] * n
    assert keep[1].sum() == len(smol("Hi").input_ids) and not keep[1, mask[1] == 0].any()
    # One text, a single string; chat markers are special, the chat BOS is not doubled.
    ids, mask, keep = tokenize(smol, "Name a colour.", chat=True)
    assert ids.shape[0] == 1 and ids[0, 0] == bos and ids[0, 1] != bos
    special = {int(t) for t in ids[0, ~keep[0]]}
    assert smol.convert_tokens_to_ids("<|im_end|>") in special and bos in special
    words = smol.decode(ids[0, keep[0]])
    assert "Name a colour." in words and "<|im_start|>" not in words
    # A tokenizer that adds BOS itself gets it once.
    ids, _, keep = tokenize(word, ["the cat", "[BOS] a dog"], pad_side="left")
    assert ids.tolist() == [[1, 4, 6], [1, 5, 7]] and keep[:, 0].eq(False).all()


def test_tokenize_from_an_lm_and_without_a_bos_token():
    from tiny_lm import char_tokenizer, tiny_lm
    from transformers import PreTrainedTokenizerFast

    lm = tiny_lm()  # an LM: its tokenizer is used
    ids, mask, keep = tokenize(lm, ["ab"])
    assert ids.tolist() == [[1, *lm.tokenizer("ab", add_special_tokens=False).input_ids]]
    assert ids.dtype == mask.dtype == torch.int64 and keep.tolist() == [[False, True, True]]
    # No BOS token at all (GPT-2 style): nothing to put first, every text token kept.
    plain = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(bos=False).backend_tokenizer,
                                    eos_token="<eos>", pad_token="<pad>")
    ids, mask, keep = tokenize(plain, ["ab", "c"])
    assert ids.tolist() == [[ids[0, 0], ids[0, 1]], [ids[1, 0], plain.pad_token_id]]
    assert keep.tolist() == [[True, True], [True, False]] and mask.tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="non-empty"):
        tokenize(lm, [])


# ---------------------------------------------------------------- import graph


def _imports(path: Path) -> set[str]:
    """Modules `path` imports (anywhere in the file, also inside functions)."""
    module = "saelab." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__"
              and node.args and isinstance(node.args[0], ast.Constant)):
            found.add(node.args[0].value)
    return found


def test_no_stage_imports_the_root_cli():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.name not in ("cli.py", "__main__.py") and "saelab.cli" in _imports(p)]
    assert not offenders, f"import saelab.cli (the root registers the stages, not the reverse): {offenders}"


def test_corpus_and_builtin_are_not_a_circle():
    builtin = _imports(ROOT / "data" / "builtin.py")
    corpus = _imports(ROOT / "data" / "corpus.py")
    assert "saelab.data.builtin" in corpus  # corpus wraps the builtin documents
    assert not any(m.startswith("saelab.data.corpus") for m in builtin)
    # And builtin stays free of heavy imports: it is read by `saelab.data.corpus` at import.
    assert not any(m.split(".")[0] in ("torch", "numpy", "transformers") for m in builtin)


def test_the_demo_hint_names_a_command_that_runs(tmp_path, monkeypatch):
    """After `make demo` the venv is not active: the hint must not say a bare `saelab`."""
    from saelab.console import saelab_command

    script = tmp_path / ".venv" / "bin" / "saelab"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/saelab", "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert saelab_command() == ".venv/bin/saelab"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # activated
    assert saelab_command() == "saelab"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "__main__.py"), "demo"])  # python -m saelab
    assert saelab_command().endswith(" -m saelab")
