"""Build the MiniLM reference sentence sets (compress/reference/texts/{calib,eval}.txt).

Sources, all offline: general.txt (everyday sentences written for this project) and prose
sentences from the Python documentation topics shipped with CPython (pydoc_data). The two
output files are disjoint, shuffled with a fixed seed, and committed, so every machine
calibrates and evaluates on the same text whatever its Python build.
Run: .venv/bin/python scripts/build_text_sets.py
"""

from __future__ import annotations

import random
import re
from pathlib import Path

TEXTS = Path(__file__).resolve().parents[1] / "compress" / "reference" / "texts"
SEED = 0


def python_doc_sentences() -> list[str]:
    import pydoc_data.topics as topics

    out = []
    for para in re.split(r"\n\s*\n", "\n".join(topics.topics.values())):
        if para.startswith("   ") or "::" in para or ">>>" in para:
            continue  # code blocks and literal examples
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(para.split())):
            words = s.split()
            letters = sum(c.isalpha() or c == " " for c in s) / max(len(s), 1)
            if 8 <= len(words) <= 40 and s[-1] in ".!?" and letters > 0.9 and \
                    not re.search(r"[*`\[\]{}=_]", s):
                out.append(s)
    return list(dict.fromkeys(out))


def main() -> None:
    general = [line.strip() for line in (TEXTS / "general.txt").read_text().splitlines()
               if line.strip()]
    docs = python_doc_sentences()
    rng = random.Random(SEED)
    rng.shuffle(general)
    rng.shuffle(docs)
    # Each set gets half of each source, so both mix everyday and technical English.
    half_g, half_d = len(general) // 2, len(docs) // 2
    calib = general[:half_g] + docs[:half_d]
    evals = general[half_g:] + docs[half_d:]
    rng.shuffle(calib)
    rng.shuffle(evals)
    assert not set(calib) & set(evals)
    (TEXTS / "calib.txt").write_text("\n".join(calib) + "\n")
    (TEXTS / "eval.txt").write_text("\n".join(evals) + "\n")
    print(f"calib.txt: {len(calib)} sentences, eval.txt: {len(evals)} sentences")


if __name__ == "__main__":
    main()
