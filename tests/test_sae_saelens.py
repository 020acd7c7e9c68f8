"""Cross-library check against the real SAELens, run in its bench-only venv.

Skipped unless bench/.venv-saelens exists (create it with `python3 -m venv
bench/.venv-saelens && bench/.venv-saelens/bin/pip install torch==2.13.0 sae-lens`).
Folders saelab writes must give the same feature activations in SAELens, and
folders SAELens writes the same activations in saelab.
"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.sae import load_sae, save_sae
from saelab.sae.testing import random_sae

BENCH = Path(__file__).resolve().parents[1] / "bench"
PYTHON = BENCH / ".venv-saelens" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not PYTHON.exists(), reason="no SAELens venv at bench/.venv-saelens"
)

OURS = ["relu", "jumprelu", "topk", "batchtopk"]
THEIRS = ["standard", "jumprelu", "topk", "topk_rescaled", "batchtopk"]


def test_saelens_reads_ours_and_we_read_theirs(tmp_path: Path) -> None:
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    load_jobs, write_jobs = [], []
    for arch in OURS:
        sae = random_sae(arch, metadata={"site": "resid_post.2", "model_name": "tiny-model"})
        save_sae(sae, tmp_path / f"ours-{arch}", "saelens")
        load_jobs.append({"dir": str(tmp_path / f"ours-{arch}"), "x": str(tmp_path / "x.safetensors"),
                          "out": str(tmp_path / f"ours-{arch}.out.safetensors")})  # fmt: skip
    for i, arch in enumerate(THEIRS):
        write_jobs.append({"arch": arch, "seed": i, "dir": str(tmp_path / f"theirs-{arch}"),
                           "x": str(tmp_path / "x.safetensors"),
                           "out": str(tmp_path / f"theirs-{arch}.out.safetensors")})  # fmt: skip
    job = {"mode": "interop", "d_in": 16, "d_sae": 64, "load": load_jobs, "write": write_jobs}
    (tmp_path / "job.json").write_text(json.dumps(job))
    res = subprocess.run(
        [str(PYTHON), str(BENCH / "saelens_worker.py"), str(tmp_path / "job.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]

    for arch in OURS:  # SAELens on saelab's folders
        theirs = load_file(str(tmp_path / f"ours-{arch}.out.safetensors"))
        with torch.no_grad():
            ours = random_sae(arch)(x)
        torch.testing.assert_close(theirs["feats"], ours.feats, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs["x_hat"], ours.x_hat, rtol=1e-5, atol=1e-5)
    for arch in THEIRS:  # saelab on SAELens's folders
        theirs = load_file(str(tmp_path / f"theirs-{arch}.out.safetensors"))
        sae = load_sae(tmp_path / f"theirs-{arch}")
        with torch.no_grad():
            ours = sae(x)
        assert (theirs["feats"] != 0).any() and (theirs["feats"] == 0).any()
        torch.testing.assert_close(ours.feats, theirs["feats"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.x_hat, theirs["x_hat"], rtol=1e-5, atol=1e-5)
        assert sae.cfg.site == "resid_post.2" and sae.cfg.model_name == "tiny-model"
