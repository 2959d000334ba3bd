"""The benchmark scripts still run (at toy sizes): they are not tests, but nothing else would notice them break."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
                    reason="needs the bench peers (torch, transformers)")
def test_decode_benchmark_runs(tmp_path):
  out = tmp_path / "decode.json"
  proc = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "decode.py"), "--tiny", "--batch", "4", "--inputs-length", "16",
       "--new-tokens", "4", "--repeats", "1", "--json", str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = json.loads(out.read_text())
  assert results["frameworks"]["t5mix"]["tokens_per_s"] > 0
  assert "t5mix" in proc.stdout and "tokens/s" in proc.stdout
  if "hf_torch" in results["frameworks"]:  # same weights, float32: greedy outputs should agree
    assert results["frameworks"]["hf_torch"]["tokens_per_s"] > 0
    assert 0.0 <= results["agreement"]["token_fraction"] <= 1.0
