"""Corpora: the builtin offline corpus, local file readers, and the hub fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import saelab.data.corpus as corpus_mod
from saelab.data.corpus import Corpus, builtin_corpus, load_corpus
from saelab.errors import CorruptFileError, OfflineError, SaelabError

DOCS = ["First document.\nIt has two lines.", "Second one,\n\nwith a paragraph break.",
        "Third: ünïcode ✓"]


def test_builtin_is_large_clean_and_stable():
    corpus = load_corpus("builtin")
    docs = list(corpus)
    stats = corpus.stats()
    assert stats.n_chars > 1_000_000 and stats.n_docs == len(docs) > 500
    assert all(len(d) >= 200 and d == d.strip() and "\n\n\n" not in d for d in docs)
    assert len({" ".join(d.split()) for d in docs}) == len(docs)  # deduplicated
    # Both sources are there, interleaved rather than one after the other.
    is_topic = ["****" in d.splitlines()[1] if "\n" in d else False for d in docs]
    assert 20 < sum(is_topic[:200]) < 180
    # Recomputed from scratch: same documents, same hash.
    corpus_mod._builtin_docs.cache_clear()
    again = builtin_corpus()
    assert again.sha256 == corpus.sha256 and list(again) == docs


def test_builtin_hash_is_stable_across_processes():
    # A different string-hash seed must not change the order or the content.
    code = "from saelab.data.corpus import builtin_corpus; print(builtin_corpus().sha256)"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == builtin_corpus().sha256


def test_builtin_falls_back_in_process(monkeypatch):
    def no_subprocess(*a, **k):
        raise OSError("spawning is not allowed here")

    monkeypatch.setattr(corpus_mod.subprocess, "run", no_subprocess)
    with pytest.warns(UserWarning, match="spawning is not allowed"):
        sections = corpus_mod._stdlib_sections()
    assert "doc:json" in sections and "doc:collections.OrderedDict" in sections


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
