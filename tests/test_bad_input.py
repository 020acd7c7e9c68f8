"""Fault injection: every numeric option of every command at 0, negative, NaN and absurd.

The commands and their int/float options are read from the typer app itself, so an
option added later is covered without editing this file. Each bad value must give
exit 2 and exactly one line of output, no traceback, and must fail before a model,
an SAE, a cache or a server is touched: those entry points are replaced by a
sentinel that fails the case if it is reached. (option, value) pairs that are valid
are in ALLOWED, each with its reason.
"""

from __future__ import annotations

import math
import types
from typing import Union, get_args, get_origin

import pytest
import typer
import typer.testing
from typer.testing import CliRunner

from saelab.cli import app

# Values tried; ints are passed as digits (click parses "1e12" as no int).
VALUES = {"zero": "0", "negative": "-5", "nan": "nan", "absurd": "1000000000000"}

# Valid (command, option, value kind) pairs, with why; these are not run.
ALLOWED = {
    **{(cmd, "--seed", kind): "any seed >= 0 is a seed"
       for cmd in ("train", "eval", "features", "generate", "study lists", "study synthetic",
                   "explain", "study dictionaries")
       for kind in ("zero", "absurd")},
    ("eval", "--bootstrap", "zero"): "0 replicates: no intervals (documented)",
    ("attribute", "--verify", "zero"): "0: no verification (the default)",
    ("graph", "--node-threshold", "zero"): "0: keep every node with influence (a fraction)",
    ("graph", "--edge-threshold", "zero"): "0: keep the strongest edges only (a fraction)",
    ("serve", "--port", "zero"): "0: any free port (documented)",
    ("train", "--checkpoint-every", "zero"): "0: checkpoint only at the end (documented)",
    ("train", "--checkpoint-every", "absurd"): "more than --tokens: only at the end",
    ("train", "--l1", "zero"): "no L1 penalty is a valid (if dense) SAE",
    ("train", "--l0-coef", "zero"): "no L0 penalty is a valid (if dense) SAE",
    ("features", "--per-bin", "zero"): "0: no binned examples",
    ("features", "--left", "zero"): "0 tokens shown before the example",
    ("features", "--right", "zero"): "0 tokens shown after it",
    ("features", "--ablate", "zero"): "0: no token ablation",
    ("features", "--ablate-per-bin", "zero"): "0: ablated text of top examples only (documented)",
    ("features", "--cards", "zero"): "0: no cards in dashboard.html",
    ("generate", "--feature", "zero"): "feature 0 exists in every SAE",
    ("generate", "--strength", "zero"): "add 0 / clamp to 0 are edits",
    ("generate", "--strength", "negative"): "a negative strength steers away",
    ("generate", "--temperature", "zero"): "0 is greedy decoding (documented)",
    ("study synthetic", "--plateau-n", "zero"): "0: skip the plateau experiment (documented)",
    ("study dictionaries", "--featured", "zero"): "0: no feature cards in the report",
    ("study dictionaries", "--index-ablate", "zero"): "0: no ablated text in the indexes",
}

# The least each command needs besides the option under test (nothing here is read:
# the bad value must be refused first).
REQUIRED = {
    "": [],  # root options go before a command: `saelab --threads 0 sites`
    "sites": [],
    "harvest": ["--sites", "resid_post.0", "--out", "{tmp}/h"],
    "train": ["--out", "{tmp}/t"],
    "eval": ["{tmp}/sae"],
    "features": ["{tmp}/sae"],
    "explain": ["{tmp}/index"],
    "serve": ["{tmp}/run"],
    "attribute": ["--prompt", "x", "--sae", "{tmp}/sae", "--metric", 'logprob:"a"'],
    "graph": ["--prompt", "x", "--transcoders", "{tmp}/tc", "--out", "{tmp}/g"],
    "generate": ["--prompt", "x"],
    "demo": ["--out", "{tmp}/demo"],
    "study lists": ["--out", "{tmp}/lists"],
    "study synthetic": ["--out", "{tmp}/syn"],
    "scope export": ["{tmp}/scope", "--neuronpedia", "{tmp}/np"],
    "study dictionaries": ["--out", "{tmp}/dict"],
}


def _leaf_commands(command, path=()):
    import typer._click as click  # typer >= 0.20 vendors click

    if not path:
        yield "", command  # the root's own options (--threads)
    if hasattr(command, "list_commands"):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _leaf_commands(command.get_command(ctx, name), (*path, name))
    else:
        yield " ".join(path), command


def _numeric_type(param) -> type | None:
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next((a for a in get_args(annotation) if a is not type(None)), None)
    return annotation if annotation in (int, float) else None


def numeric_options() -> list[tuple[str, str, type]]:
    """(command path, option, int or float) for every numeric option of every command."""
    out = []
    for path, command in _leaf_commands(typer.main.get_command(app)):
        for param in command.params:
            kind = _numeric_type(param)
            if kind is not None and param.param_type_name == "option":
                out.append((path, param.opts[0], kind))
    return out


OPTIONS = numeric_options()
CASES = [(cmd, opt, kind, value_kind) for cmd, opt, kind in OPTIONS for value_kind in VALUES
         if (cmd, opt, value_kind) not in ALLOWED]


class Reached(Exception):
    """A model, SAE, cache or server was touched: the bad value was not refused first."""


def _import_all_of_saelab() -> None:
    """Import every module now, so none is first imported (binding a sentinel with
    `from ... import load_model`) while `nothing_loads` has patched it."""
    import importlib
    import pkgutil

    import saelab

    for info in pkgutil.walk_packages(saelab.__path__, "saelab."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    _import_all_of_saelab()
    def reached(*args, **kwargs):
        raise Reached(f"loaded something with {args[:1]}")

    import saelab.app.server
    import saelab.data.store
    import saelab.models.load
    import saelab.sae
    import saelab.sae.formats
    import saelab.studies.lists
    import saelab.studies.lists_commands

    monkeypatch.setattr(saelab.models.load, "load_model", reached)
    monkeypatch.setattr(saelab.sae, "load_sae", reached)
    monkeypatch.setattr(saelab.sae.formats, "load_sae", reached)
    monkeypatch.setattr(saelab.data.store, "ActivationStore", reached)
    monkeypatch.setattr(saelab.app.server, "make_server", reached)
    monkeypatch.setattr(saelab.studies.lists_commands, "run_with_progress", reached)
    monkeypatch.setattr(saelab.studies.lists, "run_lists", reached)
    monkeypatch.setenv("SAELAB_THREADS", "1")
    # typer rebuilds the whole command tree on every invoke (~0.1 s, all of it typing
    # introspection); build it once, so a case costs what the validation costs.
    build = typer.testing._get_command
    monkeypatch.setattr(typer.testing, "_get_command",
                        lambda a: _BUILT.setdefault(id(a), build(a)) if a is app else build(a))


_BUILT: dict = {}


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=True)


def assert_one_line_exit_2(result, args) -> None:
    shown = f"saelab {' '.join(args)} ->\n{result.output}"
    assert not isinstance(result.exception, Reached), f"validated too late: {shown}"
    assert "Traceback" not in result.output, shown
    assert result.exit_code == 2, f"exit {result.exit_code}: {shown}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), shown


def test_every_command_has_numeric_options_enumerated() -> None:
    commands = {cmd for cmd, _, _ in OPTIONS}
    # every command that takes a number, found from the app, not listed by hand
    assert {"", "harvest", "train", "eval", "features", "serve", "attribute", "generate",
            "demo", "study lists", "study synthetic"} <= commands
    assert commands <= set(REQUIRED), f"add the new command's required args: {commands - set(REQUIRED)}"
    assert len(CASES) >= 150


@pytest.mark.parametrize(("cmd", "opt", "kind", "value_kind"), CASES,
                         ids=[f"{c or 'saelab'}-{o}-{v}" for c, o, _, v in CASES])
def test_bad_numeric_option(cmd, opt, kind, value_kind, tmp_path) -> None:
    base = [a.format(tmp=tmp_path) for a in REQUIRED[cmd]]
    args = ([opt, VALUES[value_kind], "sites"] if cmd == "" else
            [*cmd.split(), *base, opt, VALUES[value_kind]])
    result = invoke(args)
    if kind is int and value_kind == "nan":
        # typer's parser refuses a non-integer itself; saelab/cli.py makes that one line too
        assert "valid integer" in result.output
    assert_one_line_exit_2(result, args)


def test_allowed_values_are_documented() -> None:
    """Every allow-listed pair names an option that exists, with a reason."""
    known = {(cmd, opt) for cmd, opt, _ in OPTIONS}
    for (cmd, opt, kind), why in ALLOWED.items():
        assert (cmd, opt) in known and kind in VALUES and why


# ---------------------------------------------------------------- named instances (#13)
@pytest.mark.parametrize("args", [
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h", "--tokens", "0"],
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h", "--tokens", "-5"],
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h", "--batch-size", "0"],
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h", "--context", "1"],
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h", "--store-dtype", "int8"],
    ["train", "--out", "{tmp}/t", "--width", "0"],
    ["train", "--out", "{tmp}/t", "--k", "2000", "--width", "1152"],
    ["train", "--out", "{tmp}/t", "--k", "0"],
    ["train", "--out", "{tmp}/t", "--arch", "foo"],
    ["train", "--out", "{tmp}/t", "--batch-size", "0"],
    ["train", "--out", "{tmp}/t", "--lr", "-1"],
    ["train", "--out", "{tmp}/t", "--lr", "nan"],
    ["train", "--out", "{tmp}/t", "--checkpoint-every", "-5"],
    ["train", "--out", "{tmp}/t", "--sites", ","],
    ["train", "--out", "{tmp}/t", "--width", "abc"],
    ["generate", "--prompt", "x", "--strength", "nan"],
    ["generate", "--prompt", "x", "--mode", "boost"],
    ["serve", "{tmp}", "--port", "99999"],
    ["serve", "{tmp}", "--port", "-1"],
    ["eval", "{tmp}/sae", "--skip-contexts", "-3"],
])
def test_named_instance(args, tmp_path) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_exit_2(invoke(args), args)


@pytest.mark.parametrize("cmd", [
    ["harvest", "--sites", "resid_post.0", "--out", "{tmp}/h"],
    ["train", "--out", "{tmp}/t"],
])
@pytest.mark.parametrize("context", ["8500", "100000"])
def test_context_past_the_models_positions(cmd, context, tmp_path) -> None:
    """Refused from config.json (max_position_embeddings) before the weights load."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 8192}')
    args = [a.format(tmp=tmp_path) for a in cmd] + ["--model", str(model), "--context", context]
    result = invoke(args)
    assert_one_line_exit_2(result, args)
    assert "8,192" in result.output


def test_unexpected_error_is_one_line_exit_1(monkeypatch) -> None:
    """The last line of defence: an error no check foresaw names the command, exit 1."""
    from saelab.console import user_errors

    @user_errors
    def harvest():
        return 1 / 0

    app2 = typer.Typer()
    app2.command()(harvest)
    app2.command("other")(lambda: None)
    result = CliRunner().invoke(app2, ["harvest"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "saelab harvest failed: ZeroDivisionError" in lines[0]
    assert "SAELAB_DEBUG=1" in lines[0]
    monkeypatch.setenv("SAELAB_DEBUG", "1")
    result = CliRunner().invoke(app2, ["harvest"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_nan_is_never_a_number() -> None:
    from saelab.checks import number
    from saelab.errors import BadValueError

    for bad in (math.nan, math.inf, -math.inf, "1", True, None):
        with pytest.raises(BadValueError):
            number("x", bad)
