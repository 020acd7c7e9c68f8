"""Corpora: the builtin offline corpus, local file readers, and the hub fallback."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import saelab.data.builtin as builtin_mod
import saelab.data.corpus as corpus_mod
from saelab.data.builtin import builtin_manifest
from saelab.data.corpus import Corpus, load_corpus
from saelab.errors import CorruptFileError, OfflineError, SaelabError

DOCS = ["First document.\nIt has two lines.", "Second one,\n\nwith a paragraph break.",
        "Third: ünïcode ✓"]


def _check_clean(docs):
    assert all(len(d) >= 200 and d == d.strip() and "\n\n\n" not in d and "\0" not in d
               for d in docs)
    assert len({" ".join(d.split()) for d in docs}) == len(docs)  # deduplicated


def test_builtin_stdlib_is_clean_and_deterministic():
    corpus = load_corpus("builtin:stdlib")
    assert (corpus.name, corpus.kind, corpus.hash_kind) == ("builtin:stdlib", "builtin", "content")
    docs = list(corpus)
    stats = corpus.stats()
    assert stats.n_chars > 1_000_000 and stats.n_docs == len(docs) > 500
    _check_clean(docs)
    # Topics and docstrings, interleaved rather than one after the other.
    is_topic = ["****" in d.splitlines()[1] if "\n" in d else False for d in docs]
    assert 10 < sum(is_topic[:200]) < 150
    assert any(d.startswith("json.decoder.JSONDecoder\n") for d in docs)
    manifest = builtin_manifest("builtin:stdlib")
    assert [s["source"] for s in manifest["sources"]] == ["pydoc_data.topics", "stdlib"]
    assert manifest["fingerprint"]["packages"] == {}
    # Built from scratch in another process, with another string-hash seed: the same
    # documents as the (usually cached) corpus above.
    code = ("from saelab.data.builtin import build; from saelab.data.corpus import Corpus; "
            "print(Corpus.from_texts('x', build()[0]).sha256)")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == corpus.sha256


def test_builtin_full():
    """The big default: built once per environment (about 20 s), then cached."""
    corpus = load_corpus("builtin")
    assert corpus.name == "builtin"
    manifest = builtin_manifest()
    sources = {s["source"]: s for s in manifest["sources"]}
    assert list(sources)[:2] == ["pydoc_data.topics", "stdlib"]
    for name in ("numpy", "scipy", "torch", "transformers", "matplotlib"):
        assert sources[name]["n_docs"] > 100 and sources[name]["version"]
    assert manifest["fingerprint"]["packages"]["torch"] == sources["torch"]["version"]
    # ~3.4 characters a SmolLM2 token: 17 M characters is 5 M tokens.
    assert corpus.stats().n_chars > 17_000_000 and manifest["n_docs"] > 5000
    stdlib = set(load_corpus("builtin:stdlib"))
    head = list(itertools.islice(corpus, 300))
    assert 0 < sum(d in stdlib for d in head) < 100  # interleaved with the packages
    _check_clean(head)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """A tiny 'standard library' and package `fakepkg`, and an empty cache."""
    doc = '"""{}"""\n'
    stdlib = tmp_path / "stdlib"
    (stdlib / "tests").mkdir(parents=True)
    (stdlib / "tests" / "t.py").write_text(doc.format("Skipped: a test folder. " * 12))
    (stdlib / "alpha.py").write_text(
        doc.format("Alpha module. " * 20)
        + 'def shared():\n    """' + "A docstring found twice. " * 10 + '"""\n')
    pkg = tmp_path / "site" / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "tests").mkdir()
    (pkg / "__init__.py").write_text(
        doc.format("The fake package. " * 8)
        + 'def public():\n    """Public function ' + "that does things. " * 8 + '"""\n'
        + 'def _private():\n    """Private helper, left out. ' + "x " * 40 + '"""\n')
    (pkg / "sub" / "mod.py").write_text(
        "class Thing:\n"
        '    """A thing ' + "with a long description. " * 8 + '"""\n'
        '    def __init__(self):\n        """Make a thing ' + "carefully. " * 6 + '"""\n'
        '    def go(self):\n        """Go somewhere."""\n'
        '    def _hidden(self):\n        """Hidden method, left out."""\n'
        '    def __repr__(self):\n        """Repr, kept: a dunder written in Python."""\n'
        'def shared():\n    """' + "A docstring found twice. " * 10 + '"""\n'
        'def doctest():\n    """\n    >>> 1 + 1\n    2\n    >>> 2 + 2\n    4\n    """\n')
    (pkg / "_impl.py").write_text(doc.format("Private modules are read: " * 10))
    (pkg / "broken.py").write_text(doc.format("Broken. " * 30) + "def (:\n")
    (pkg / "convert_weights.py").write_text(doc.format("Conversion script. " * 20))
    (pkg / "tables.py").write_text(doc.format("Mostly code. " * 16) + "x = 1\n" * 400)
    (pkg / "tests" / "test_a.py").write_text(doc.format("Test module. " * 20))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(builtin_mod.sysconfig, "get_paths", lambda: {"stdlib": str(stdlib)})
    monkeypatch.setenv("SAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(builtin_mod.VARIANTS, "builtin:fake", ("fakepkg", "not_installed_pkg"))
    builtin_mod._load.cache_clear()
    yield tmp_path
    builtin_mod._load.cache_clear()


def test_builtin_build_mechanism(fake_env):
    docs, sources = builtin_mod.build(["fakepkg", "not_installed_pkg"])
    assert [s["source"] for s in sources] == ["pydoc_data.topics", "stdlib", "fakepkg"]
    fake = sources[2]
    assert fake["version"] == "unknown" and fake["n_docs"] == 3  # no metadata on sys.path
    text = "\n".join(docs)
    for kept in ("alpha\n\nAlpha module.", "fakepkg\n\nThe fake package.",
                 "public\n\nPublic function", "fakepkg.sub.mod.Thing\n\nA thing",
                 "Thing.__init__\n\nMake a thing", "Thing.go\n\nGo somewhere.",
                 "Thing.__repr__", "fakepkg._impl\n\nPrivate modules are read"):
        assert kept in text, kept
    for dropped in ("Private helper", "Hidden method", ">>> 1 + 1", "Broken.", "Conversion",
                    "Mostly code", "Test module", "test folder"):
        assert dropped not in text, dropped
    assert text.count("A docstring found twice.") == 10  # the second copy was dropped
    _check_clean(docs)
    assert builtin_mod.build(["fakepkg"]) == (docs, sources)


def test_builtin_cache(fake_env, monkeypatch):
    builds = []
    real_build = builtin_mod.build
    monkeypatch.setattr(builtin_mod, "build", lambda p: builds.append(p) or real_build(p))
    corpus = load_corpus("builtin:fake")
    assert builds == []  # nothing is read before the first document is asked for
    docs = list(corpus)
    assert builds == [("fakepkg", "not_installed_pkg")]
    folder = fake_env / "cache" / "corpus"
    [path] = folder.glob("builtin-fake-*.txt")
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary file left
    # Another process (a cleared memo) reads the file instead of building again.
    builtin_mod._load.cache_clear()
    assert list(load_corpus("builtin:fake")) == docs and len(builds) == 1
    assert builtin_manifest("builtin:fake")["fingerprint"]["packages"] == {
        "fakepkg": "unknown", "not_installed_pkg": None}
    # A truncated file is built again, and rewritten.
    path.write_bytes(path.read_bytes()[:-50])
    builtin_mod._load.cache_clear()
    assert list(load_corpus("builtin:fake")) == docs and len(builds) == 2
    # Another package version is another environment: a new build next to the old one;
    # only the newest few are kept.
    for i in range(4):
        builtin_mod._load.cache_clear()
        monkeypatch.setattr(builtin_mod, "_package_version", lambda n, i=i: f"1.{i}")
        list(load_corpus("builtin:fake"))
    assert len(builds) == 6
    assert len(list(folder.glob("builtin-fake-*.txt"))) == builtin_mod._KEEP_BUILDS


def test_builtin_cache_unwritable(fake_env, monkeypatch):
    (fake_env / "cache").write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning) as record:
        docs = list(load_corpus("builtin:fake"))
    [warning] = record
    message = str(warning.message)
    assert "could not cache the builtin corpus" in message
    assert "\n" not in message and len(message) < 200
    assert docs


def test_builtin_unknown_variant():
    with pytest.raises(SaelabError, match="unknown builtin corpus 'builtin:nope'.*builtin:stdlib"):
        load_corpus("builtin:nope")


def _write_all(tmp_path, docs, field="text"):
    (tmp_path / "d.txt").write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(
        "\n".join(json.dumps({field: d, "id": i}) for i, d in enumerate(docs)), encoding="utf-8")
    pq.write_table(pa.table({field: docs}), tmp_path / "d.parquet", row_group_size=2)


def test_formats_agree_and_hash_content(tmp_path):
    _write_all(tmp_path, DOCS)
    hashes = set()
    for name in ("d.txt", "d.jsonl", "d.parquet"):
        corpus = load_corpus(tmp_path / name)
        assert list(corpus) == DOCS and list(corpus) == DOCS  # re-iterable
        assert corpus.kind == name.split(".")[1] and corpus.hash_kind == "content"
        hashes.add(corpus.sha256)
    hashes.add(Corpus.from_texts("mem", DOCS).sha256)
    assert len(hashes) == 1
    assert Corpus.from_texts("mem", DOCS[::-1]).sha256 not in hashes


def test_txt_separators(tmp_path, monkeypatch):
    text = ("one\n\nstill one\n\n\ntwo\n \n\t\nthree\fthree-b\r\n\r\n\r\nfour\n\n\n\n\n\n"
            "  five  \n" + "\f" * 3)
    expected = ["one\n\nstill one", "two", "three", "three-b", "four", "five"]
    path = tmp_path / "x.txt"
    path.write_bytes(text.encode())
    assert list(load_corpus(path)) == expected
    # Tiny reads put separators across chunk boundaries; the result must not change.
    for size in (1, 2, 3, 7):
        monkeypatch.setattr(corpus_mod, "_TXT_CHUNK", size)
        assert list(load_corpus(path)) == expected


def test_txt_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(CorruptFileError, match="not UTF-8.*iconv"):
        load_corpus(tmp_path / "latin.txt")


def test_jsonl_field_nulls_and_errors(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        load_corpus(tmp_path / "latin.jsonl")
    path = tmp_path / "c.jsonl"
    path.write_text('{"body": "a"}\n\n{"body": null}\n{"body": "b", "x": 1}\n')
    assert list(load_corpus(path, text_field="body")) == ["a", "b"]
    with pytest.raises(SaelabError, match=r"line 1: no field 'text' \(fields: body\)"):
        load_corpus(path)
    path.write_text('{"text": "a"}\n{"text": 3}\n')
    with pytest.raises(SaelabError, match="line 2: field 'text' holds a int"):
        list(load_corpus(path))
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    corpus = load_corpus(path)
    with pytest.raises(CorruptFileError, match="line 3: not valid JSON"):
        list(corpus)
    path.write_text('["a list"]\n')
    with pytest.raises(CorruptFileError, match="line 1: a JSON list; expected an object"):
        load_corpus(path)


def test_parquet_column_errors(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x", None, "", "y"] * 3, "n": list(range(12))}), path,
                   row_group_size=5)
    assert list(load_corpus(path, text_field="body")) == ["x", "y"] * 3
    coded = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"text": pa.array(["p", "q", "p"]).dictionary_encode()}), coded)
    assert list(load_corpus(coded)) == ["p", "q", "p"]
    with pytest.raises(SaelabError, match=r"no column 'text' \(columns: body, n\)"):
        load_corpus(path)
    with pytest.raises(SaelabError, match="column 'n' has type int64; expected strings"):
        load_corpus(path, text_field="n")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorruptFileError, match="not a readable parquet"):
        load_corpus(tmp_path / "bad.parquet")


def test_directory(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "z.txt").write_text("from b/z")
    (tmp_path / "a.txt").write_text("from a\n\n\nalso a")
    (tmp_path / "c.jsonl").write_text('{"text": "from c"}')
    (tmp_path / ".hidden" / "h.txt").write_text("hidden")
    (tmp_path / "notes.md").write_text("ignored")
    assert list(load_corpus(tmp_path)) == ["from a", "also a", "from b/z", "from c"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SaelabError, match="holds no .txt"):
        load_corpus(tmp_path / "empty")


def test_bad_specs(tmp_path):
    with pytest.raises(SaelabError, match="unknown corpus 'biultin'.*'builtin'.*hf:org/name"):
        load_corpus("biultin")
    with pytest.raises(SaelabError, match="does not exist"):
        load_corpus(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(SaelabError, match="suffix '.csv'"):
        load_corpus(tmp_path / "x.csv")
    (tmp_path / "blank.txt").write_text("\n\n \n")
    with pytest.raises(SaelabError, match="no non-empty documents"):
        load_corpus(tmp_path / "blank.txt")


@pytest.fixture
def online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("spec", ["hf:org/name", "org/name", "hf:org/name:config"])
def test_hub_without_datasets_is_offline_error(spec, online, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even if installed
    with pytest.raises(OfflineError, match="`datasets` package.*'builtin' or a local") as err:
        load_corpus(spec)
    assert ("taken for a dataset" in str(err.value)) == (not spec.startswith("hf:"))


def test_hub_respects_offline_env(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: calls.append(a) or [])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_DATASETS_OFFLINE is set"):
        load_corpus("hf:org/name")
    assert calls == []  # never reached for the network


def test_hub_streams_through_datasets(online, monkeypatch):
    rows = [{"text": "hub doc one"}, {"text": None}, {"text": "hub doc two"}]
    seen = {}

    def load_dataset(name, config, *, split, streaming):
        seen.update(name=name, config=config, split=split, streaming=streaming)
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("hf:org/name:cfg", split="validation")
    assert seen == {"name": "org/name", "config": "cfg", "split": "validation", "streaming": True}
    assert list(corpus) == ["hub doc one", "hub doc two"]
    assert corpus.hash_kind == "identity" and len(corpus.sha256) == 64
    with pytest.raises(SaelabError, match="row 0: no field 'body'"):
        list(load_corpus("org/name", text_field="body"))

    def unreachable(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(OfflineError, match="could not reach.*no route to host"):
        load_corpus("hf:org/name")
