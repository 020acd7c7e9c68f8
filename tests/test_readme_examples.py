"""Every ```bash and ```python example of README.md runs, so the README cannot drift.

The examples run in order, each as one script (`bash -e`, or a fresh `python`), in
a folder laid out as `make demo` leaves the repository: `runs/demo/saes/...` holds
SAEs trained by the demo's own code (`saelab.studies.saes.ensure_saes`, the same
sites and folder names, on a few thousand tokens) and `runs/demo/features/...`
their feature indexes; `.venv/bin/saelab`, `.venv/bin/python` and
`.venv/bin/activate` stand for the venv `make` builds and run this checkout.
`my_text.txt` stands for the reader's own text.

What is changed before running, so the whole file runs in minutes on a 2-core
CPU: token counts (`--tokens N`, `--sae-tokens N`, `tokens=N`) are capped at
TOKEN_CAP (TRAIN_TOKEN_CAP for `saelab train`, whose default batch is 4,096
tokens), and the features given a token ablation (`--ablate N` of `saelab
features`, `ablate=N`) at ABLATE_CAP. Flags, paths and APIs run exactly as written. A block may be skipped
only with `<!-- readme-test: skip (reason) -->` on the line before it (the demo
itself, servers, downloads, multi-process runs, studies that take minutes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TOKEN_CAP = 2048
TRAIN_TOKEN_CAP = 4096
ABLATE_CAP = 8
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+?)\)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Example:
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the reason, for a block marked to skip

    @property
    def id(self) -> str:
        return f"{self.lang}@L{self.line}"


def examples(text: str) -> list[Example]:
    """The fenced blocks in `text` whose language is bash or python, in order."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if m.group(1) in ("bash", "python"):
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(prev)
            found.append(Example(i + 1, m.group(1), "\n".join(lines[i + 1:end]) + "\n",
                                 skip.group(1) if skip else None))
        i = end + 1
    return found


def cap_sizes(code: str) -> str:
    """`code` with its sizes capped (see the module doc), one command (a line with its
    backslash continuations) at a time."""
    def capped(line: str) -> str:
        tokens = TRAIN_TOKEN_CAP if re.search(r"\bsaelab train\b", line) else TOKEN_CAP
        line = re.sub(r"(--(?:sae-)?tokens[ =]|\btokens=)(\d[\d_]*)",
                      lambda m: m.group(1) + str(min(_int(m.group(2)), tokens)), line)
        if re.search(r"\bsaelab features\b|IndexConfig\(", line):
            line = re.sub(r"(--ablate[ =]|\bablate=)(\d[\d_]*)",
                          lambda m: m.group(1) + str(min(_int(m.group(2)), ABLATE_CAP)), line)
            if "--ablate" not in line and "ablate=" not in line:  # the default is larger
                line = (line.replace("IndexConfig(", f"IndexConfig(ablate={ABLATE_CAP}, ", 1)
                        if "IndexConfig(" in line else f"{line.rstrip()} --ablate {ABLATE_CAP}")
        return line

    return "\n".join(capped(line) for line in re.split(r"(?<!\\)\n", code))


def _int(text: str) -> int:
    return int(text.replace("_", ""))


EXAMPLES = examples(README.read_text(encoding="utf-8"))


def test_the_readme_has_examples_and_few_skips():
    assert sum(e.skip is None for e in EXAMPLES) >= 15
    skipped = [e for e in EXAMPLES if e.skip]
    assert len(skipped) <= 8, [e.id for e in skipped]
    assert all(len(e.skip) > 10 for e in skipped)  # each says why


def test_extraction_and_capping():
    text = ("intro\n```bash\nsaelab a --tokens 1000000\n```\n"
            "<!-- readme-test: skip (takes an hour) -->\n\n```python\nx = 1\n```\n"
            "```text\nnot run\n```\n")
    found = examples(text)
    assert [(e.lang, e.line, e.skip) for e in found] == [("bash", 2, None),
                                                        ("python", 7, "takes an hour")]
    assert cap_sizes(found[0].code) == f"saelab a --tokens {TOKEN_CAP}\n"
    assert cap_sizes("x --sae-tokens 10\nsaelab train --k 3 \\\n  --tokens 9000000 --out a\n") == (
        f"x --sae-tokens 10\nsaelab train --k 3 \\\n  --tokens {TRAIN_TOKEN_CAP} --out a\n")
    assert cap_sizes("build(lm, IndexConfig(tokens=50_000))") == (
        f"build(lm, IndexConfig(ablate={ABLATE_CAP}, tokens={TOKEN_CAP}))")
    assert cap_sizes("saelab features S --tokens 5 \\\n --out o\nsaelab study --ablate 5") == (
        f"saelab features S --tokens 5 \\\n --out o --ablate {ABLATE_CAP}\nsaelab study --ablate 5")


def _shim(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, embedded_lm) -> tuple[Path, dict]:
    """A folder laid out as after `make demo`, and the environment to run examples in."""
    from saelab.data.corpus import load_corpus
    from saelab.features.build import IndexConfig, build_index
    from saelab.sae import load_sae
    from saelab.studies.lists import ListsConfig
    from saelab.studies.saes import SAEPlan, ensure_saes

    root = tmp_path_factory.mktemp("readme")
    quick = ListsConfig.preset_config("quick")  # the demo's sites, width and k
    plan = SAEPlan(sites=tuple(quick.sites), width=quick.sae_width, k=quick.sae_k,
                   tokens=TOKEN_CAP, batch_size=1024)
    dirs = ensure_saes(embedded_lm, plan, root / "runs" / "demo" / "saes")
    saes = {site: (load_sae(d).eval(), d) for site, d in dirs.items()}
    build_index(embedded_lm, saes, root / "runs" / "demo" / "features",
                IndexConfig(tokens=2048, ablate=4, cards=0, dashboard=False))
    docs = list(load_corpus("builtin:stdlib"))[:120]
    (root / "my_text.txt").write_text("\n\n\n".join(docs), encoding="utf-8")

    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    _shim(bin_dir / "python", f'exec "{sys.executable}" "$@"')
    _shim(bin_dir / "saelab", f'exec "{sys.executable}" -m saelab "$@"')
    (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return root, env


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example(example: Example, demo_folder):
    if example.skip:
        pytest.skip(example.skip)
    root, env = demo_folder
    code = cap_sizes(example.code)
    cmd = (["bash", "-e", "-o", "pipefail", "-c", code] if example.lang == "bash"
           else [sys.executable, "-c", code])
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (
        f"README.md line {example.line} ({example.lang}) failed with exit code "
        f"{done.returncode}:\n{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n"
        f"{done.stderr[-5000:]}")
