"""Build the demo corpus: the source text of CPython's pure-Python standard library modules (PSF-2.0).

Every Python installation carries these files offline, so the corpus needs no network and no download:

    python demo/build_corpus.py            # -> demo/corpus/{train.txt, test.txt, manifest.json}

Selection (deterministic): the top-level ``Lib/*.py`` modules of the running interpreter, sorted by name,
minus private modules (a leading underscore: C-accelerator fallbacks such as ``_pydecimal`` and internals)
and two joke modules (``this`` is rot13 text, ``antigravity`` opens a web browser). Split at the module
level: every 10th module in that order (index % 10 == 9) goes to test.txt, the rest to train.txt, so
calibration (train) and evaluation (test) never see the same module.

Each module's text is its source file as is (line endings normalised to \\n). Modules are separated by
the tokenizer's end-of-text token ``<|endoftext|>`` on a line of its own, so tokenizing a split file in one
call (as alphaquant/data.py does) yields the same document boundaries the model was trained with.
manifest.json records the Python version, each module's split, size and sha256, and the totals.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import sysconfig
from pathlib import Path

EOT = "<|endoftext|>"  # document separator = the tokenizer's eos/bos/unk special token
EXCLUDED = ("this", "antigravity")  # rot13 text; opens a browser (both trivial, not prose or code to learn)
TEST_EVERY = 10  # module i goes to test when i % TEST_EVERY == TEST_EVERY - 1
DEMO_DIR = Path(__file__).resolve().parent


def select_modules(stdlib: Path) -> list[Path]:
    """Top-level pure-Python stdlib modules, sorted by file name, minus private and joke modules."""
    return [p for p in sorted(stdlib.glob("*.py"), key=lambda p: p.name)
            if not p.name.startswith("_") and p.stem not in EXCLUDED]


def read_module(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n") + "\n"


def build(stdlib: Path, out_dir: Path) -> dict:
    """Write train.txt, test.txt and manifest.json into out_dir; return the manifest."""
    modules = select_modules(stdlib)
    if not modules:
        raise SystemExit(f"no *.py modules found in {stdlib}; pass --stdlib pointing at CPython's Lib/.")
    docs: dict[str, list[str]] = {"train": [], "test": []}
    entries = []
    for i, path in enumerate(modules):
        split = "test" if i % TEST_EVERY == TEST_EVERY - 1 else "train"
        text = read_module(path)
        docs[split].append(text)
        entries.append({"module": path.stem, "split": split, "bytes": len(text.encode("utf-8")),
                        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()})
    out_dir.mkdir(parents=True, exist_ok=True)
    totals = {}
    for split, texts in docs.items():
        body = f"{EOT}\n".join(texts)
        (out_dir / f"{split}.txt").write_text(body, encoding="utf-8", newline="\n")
        totals[split] = {"modules": len(texts), "bytes": len(body.encode("utf-8")),
                         "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest()}
    manifest = {
        "source": "CPython standard library, top-level Lib/*.py (pure-Python modules)",
        "licence": "PSF-2.0 (Python Software Foundation License Version 2)",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "selection": "sorted by file name; excluded: leading underscore, " + ", ".join(EXCLUDED),
        "split": f"module index % {TEST_EVERY} == {TEST_EVERY - 1} -> test, else train",
        "separator": f"{EOT} + newline between modules",
        "totals": totals,
        "modules": entries,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                    help="CPython's Lib/ directory (default: the running interpreter's)")
    ap.add_argument("--out", type=Path, default=DEMO_DIR / "corpus", help="output directory")
    args = ap.parse_args(argv)
    if not args.stdlib.is_dir():
        print(f"--stdlib {args.stdlib} is not a directory; pass CPython's Lib/ directory.", file=sys.stderr)
        return 2
    m = build(args.stdlib, args.out)
    for split, t in m["totals"].items():
        print(f"{split}: {t['modules']} modules, {t['bytes'] / 1e6:.2f} MB -> {args.out / (split + '.txt')}")
    print(f"built from Python {m['python_version']} ({args.stdlib})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
