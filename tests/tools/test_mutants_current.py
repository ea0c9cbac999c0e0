"""Every mutant of scripts/mutants.py still finds its text, once, in the file it mutates: a
kernel edit that moves the lines would otherwise leave a mutant reporting STALE (no mutation
check) until someone runs the script."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import mutants  # noqa: E402


def test_every_mutant_text_is_current():
    stale = []
    for name, path, old, *_ in mutants.MUTANTS:
        with open(os.path.join(ROOT, path)) as f:
            count = f.read().count(old)
        if count != 1:
            stale.append(f"{name}: found {count} times in {path}")
    assert not stale, stale
