"""Encode + decode throughput of a 576 -> 9216 SAE of each architecture, saelab vs SAELens.

    .venv/bin/python bench/encode.py [--batch 4096] [--reps 5]

Same weights and inputs for both: saelab writes each SAE as a SAELens folder and
SAELens loads that folder. SAELens lives in a bench-only venv (bench/.venv-saelens);
when it is not importable here the script re-runs itself with that venv's python,
importing saelab from the repository. Both time ``decode(encode(x))`` in fp32 on
all threads, taking turns (best of --reps); saelab's ``forward`` (which also
returns the error term and, for TopK, the sparse indices) is timed too. Weights are random with biases or
thresholds set so every architecture fires about k = 64 features per token, as a
trained SAE of this size would. Prints a table; writes bench/results/encode.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saelab.sae import SAE, SAEConfig, build_sae, save_sae  # noqa: E402

SAELENS_PY = ROOT / "bench" / ".venv-saelens" / "bin" / "python"
ARCHS = ["relu", "jumprelu", "topk", "batchtopk"]


@torch.no_grad()
def make_sae(arch: str, d_in: int, d_sae: int, k: int) -> SAE:
    g = torch.Generator().manual_seed(0)
    sae = build_sae(SAEConfig(arch, d_in, d_sae, k=k if "topk" in arch else None))
    sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / d_in**0.5)  # pre ~ N(b_enc, 1)
    sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=g) / d_in**0.5)
    sae.b_dec.copy_(torch.randn(d_in, generator=g) * 0.1)
    # P(N(0,1) > 2.46) = 64 / 9216: the cut that makes ~64 features fire per token.
    cut = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - k / d_sae)).item()
    if arch == "relu":
        sae.b_enc.fill_(-cut)
    elif arch == "jumprelu":
        sae.threshold.copy_(cut + 0.05 * torch.randn(d_sae, generator=g))
    elif arch == "batchtopk":
        sae.threshold.fill_(cut)
    return sae.eval()


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best-of-`reps` seconds per function, run in turns so that load from other
    processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def load_saelens(folder: Path):
    """SAELens's SAE from the folder saelab wrote, or None if SAELens is not importable."""
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        return None
    return SAELensSAE.load_from_disk(str(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=9216)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encode.json")
    args = ap.parse_args()
    if importlib.util.find_spec("sae_lens") is None and SAELENS_PY.exists():
        # SAELens lives in its own venv: run this script there (saelab comes from ROOT).
        sys.exit(subprocess.call([str(SAELENS_PY), "-W", "ignore", __file__, *sys.argv[1:]]))

    x = torch.randn(args.batch, args.d_in, generator=torch.Generator().manual_seed(1))
    rows, peer_version = [], None
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for arch in ARCHS:
            sae = make_sae(arch, args.d_in, args.d_sae, args.k)
            save_sae(sae, Path(tmp) / arch, "saelens")
            peer = load_saelens(Path(tmp) / arch)
            fns = {"ours": lambda s=sae: s.decode(s.encode(x)), "forward": lambda s=sae: s(x)}
            if peer is not None:
                import sae_lens

                peer_version = sae_lens.__version__
                torch.testing.assert_close(peer.encode(x), sae.encode(x), rtol=1e-4, atol=1e-4)
                fns["saelens"] = lambda p=peer: p.decode(p.encode(x))
            best = interleaved(fns, args.reps)
            tps = {name: args.batch / secs for name, secs in best.items()}
            rows.append(
                {
                    "arch": arch,
                    "l0": round((sae.encode(x) != 0).sum(-1).float().mean().item(), 1),
                    "saelab_tokens_per_s": tps["ours"],
                    "saelab_forward_tokens_per_s": tps["forward"],
                    "saelens_tokens_per_s": tps.get("saelens"),
                    "ratio": tps["ours"] / tps["saelens"] if "saelens" in tps else None,
                }
            )

    head = f"{'arch':<10} {'L0':>6} {'saelab tok/s':>13} {'(forward)':>10} {'SAELens tok/s':>14} {'ratio':>6}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        p, ratio = r["saelens_tokens_per_s"], r["ratio"]
        print(
            f"{r['arch']:<10} {r['l0']:>6} {r['saelab_tokens_per_s']:>13,.0f} "
            f"{r['saelab_forward_tokens_per_s']:>10,.0f} {(f'{p:,.0f}' if p else 'n/a'):>14} "
            f"{(f'{ratio:.2f}x' if ratio else 'n/a'):>6}"
        )
    if peer_version is None:
        print("SAELens not measured: create bench/.venv-saelens (see tests/test_sae_saelens.py)")
    result = {
        "shape": {"batch": args.batch, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k},
        "dtype": "float32",
        "reps": args.reps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "saelens_version": peer_version,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
