"""Bad SAE files and arguments: a clear error naming the problem, nothing half-loaded."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.errors import CorruptFileError, SaelabError, ShapeMismatchError, UnsafeFileError
from saelab.sae import SAE, SAEConfig, UnknownArchitectureError, load_sae, save_sae
from saelab.sae.testing import random_sae


@pytest.fixture
def saelens_dir(tmp_path: Path) -> Path:
    save_sae(random_sae("jumprelu"), tmp_path / "sae", "saelens")
    return tmp_path / "sae"


def edit_weights(folder: Path, fn) -> None:
    path = folder / "sae_weights.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def edit_cfg(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def test_width_mismatch(saelens_dir: Path) -> None:
    edit_cfg(saelens_dir, d_in=640)
    with pytest.raises(ShapeMismatchError, match=r"W_enc has shape \[16, 64\] but d_in=640"):
        load_sae(saelens_dir)


def test_unknown_architecture(saelens_dir: Path) -> None:
    edit_cfg(saelens_dir, architecture="gated")
    with pytest.raises(
        UnknownArchitectureError,
        match="'gated' is not supported; saelab reads standard, jumprelu, topk",
    ):
        load_sae(saelens_dir)
    with pytest.raises(
        UnknownArchitectureError,
        match="registered architectures are batchtopk, jumprelu, matryoshka_batchtopk, relu, topk",
    ):
        SAE.from_tensors(SAEConfig("matryoshka", d_in=4, d_sae=8), {})


def test_missing_and_misnamed_tensors(saelens_dir: Path) -> None:
    edit_weights(saelens_dir, lambda t: t.__setitem__("bdec", t.pop("b_dec")))
    with pytest.raises(CorruptFileError, match="missing b_dec and unexpected bdec"):
        load_sae(saelens_dir)
    edit_weights(saelens_dir, lambda t: t.pop("threshold"))
    with pytest.raises(CorruptFileError, match="missing b_dec, threshold"):
        load_sae(saelens_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(saelens_dir: Path, bad: float) -> None:
    edit_weights(saelens_dir, lambda t: t["W_dec"].view(-1).__setitem__(7, bad))
    with pytest.raises(CorruptFileError, match="W_dec has 1 NaN/inf"):
        load_sae(saelens_dir)


def test_truncated_files(tmp_path: Path) -> None:
    sae = random_sae("jumprelu", apply_b_dec_to_input=False)
    for fmt, name in [("saelens", "sae_weights.safetensors"), ("gemma-scope", "params.npz"),
                      ("gemma-scope-2", "params.safetensors"), ("saelens", "cfg.json")]:  # fmt: skip
        folder = tmp_path / f"{fmt}-{name}"
        save_sae(sae, folder, fmt)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(CorruptFileError, match="truncated"):
            load_sae(folder)
    folder = tmp_path / "dl"
    folder.mkdir()
    torch.save({"W_enc": torch.zeros(4, 8)}, folder / "ae.pt")
    data = (folder / "ae.pt").read_bytes()
    (folder / "ae.pt").write_bytes(data[:-200])
    with pytest.raises(CorruptFileError, match="ae.pt"):
        load_sae(folder)


class NotATensor:
    pass


def test_pickles_refused(tmp_path: Path) -> None:
    # 1. an ae.pt with a pickled object: torch.load(weights_only=True) refuses it
    (tmp_path / "dl").mkdir()
    torch.save(
        {"encoder.weight": torch.zeros(8, 4), "extra": NotATensor()}, tmp_path / "dl" / "ae.pt"
    )
    with pytest.raises(UnsafeFileError, match="arbitrary code"):
        load_sae(tmp_path / "dl")
    # 2. a params.npz holding an object array
    (tmp_path / "gs").mkdir()
    np.savez(tmp_path / "gs" / "params.npz", W_enc=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UnsafeFileError, match="pickled Python objects"):
        load_sae(tmp_path / "gs")
    # 3. a folder with only pickle-based weights
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "cfg.json").write_text("{}")
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "pt" / "sae_weights.pt")
    with pytest.raises(UnsafeFileError, match=r"sae_weights\.pt.*arbitrary code"):
        load_sae(tmp_path / "pt")


def test_errors_are_for_users() -> None:
    for err in (CorruptFileError, ShapeMismatchError, UnsafeFileError, UnknownArchitectureError):
        assert issubclass(err, SaelabError)


def test_failed_write_keeps_the_old_sae(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = random_sae("relu", seed=1)
    save_sae(old, tmp_path, "saelens")
    import saelab.sae.formats.native as native

    def broken(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(native, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(random_sae("relu", seed=2), tmp_path, "saelens")
    assert torch.equal(load_sae(tmp_path).W_enc, old.W_enc)  # the new weights were never renamed in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "params.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CorruptFileError):
        load_sae(tmp_path)
    with zipfile.ZipFile(tmp_path / "params.npz", "w") as z:
        z.writestr("W_enc.npy", b"\x93NUMPY garbage")
    with pytest.raises(CorruptFileError):
        load_sae(tmp_path)
