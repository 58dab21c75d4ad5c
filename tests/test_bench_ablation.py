"""bench/ablation.py: each named layer really goes (in the broker process it patches, never in the product), an
unknown layer is refused, and the table reports medians with their change against the full broker."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ablation import _table, _variants

REPO = Path(__file__).resolve().parents[1]
INIT = b"\x00\x00\x00\x05\x01\x00\x00\x00\x03"
PROBE = ("import sys, bench.ablation as a; a.patch_from_env(); from sessions.streams import StreamJudge; "
         "from sessions.decoders import DeepScanner; from sessions import anchors; "
         f"print(StreamJudge().feed('vendor', {INIT!r}), DeepScanner().feed(b'x' * 128 + b'DICM\\x02\\x00'))")


def _probe(value: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "MEDBROKER_BENCH_ABLATE": value}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("value,want", [("", "sftp DICOM"), ("judge", "None DICOM"), ("scan", "sftp None"),
                                        ("all", "None None")])
def test_a_switched_off_layer_finds_nothing_and_the_others_still_do(value, want):
    proc = _probe(value)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == want


def test_an_unknown_layer_is_refused():
    proc = _probe("judge,scanner")
    assert proc.returncode == 1
    assert "unknown layer(s) ['scanner']" in proc.stderr
    with pytest.raises(SystemExit, match="unknown layer"):
        _variants("none;judge,typo")


def test_the_table_shows_medians_and_the_change_against_the_full_broker():
    rows = {"none": {"upload_mb_s": [90.0, 110.0, 100.0]}, "judge": {"upload_mb_s": [170.0, 172.0]}}
    md = _table(rows, argparse.Namespace(sessions=5, seconds=3, mib=8, rounds=3, phases="upload"),
                ["judge typing: refused"])
    assert "payload 8 MiB, 3 rounds; medians" in md and "typing sessions" not in md
    assert "| medbroker, every layer on | 100.0 |" in md
    assert "| medbroker without `judge` | 171.0 (+71.0) |" in md
    assert "- judge typing: refused" in md
