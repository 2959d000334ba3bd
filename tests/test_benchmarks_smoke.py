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
  batch, new_tokens = 4, 4
  proc = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "decode.py"), "--tiny", "--batch", str(batch), "--inputs-length",
       "16", "--new-tokens", str(new_tokens), "--repeats", "1", "--json", str(out), "--breakdown"],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = json.loads(out.read_text())
  assert results["frameworks"]["t5mix"]["tokens_per_s"] > 0
  assert "t5mix" in proc.stdout and "tokens/s" in proc.stdout
  breakdown = results["t5mix_breakdown"]
  assert all(breakdown[k] > 0 for k in ("prefill_s", "greedy_s", "projection_s", "projection_weight_gb_per_s"))
  if "hf_torch" in results["frameworks"]:  # same weights, float32: greedy outputs should agree
    assert results["frameworks"]["hf_torch"]["tokens_per_s"] > 0
    agreement = results["agreement"]
    first_diff = agreement["first_difference_per_row"]  # new_tokens where a row agrees throughout
    assert agreement["rows"] == batch and len(first_diff) == batch
    assert all(0 <= d <= new_tokens for d in first_diff)
    assert agreement["rows_identical"] == sum(d == new_tokens for d in first_diff)
    # The fraction is of the batch x new_tokens tokens: those before each row's first difference
    # agree, the one at it does not, those after it may. (Rows that agree throughout pin it exactly.)
    agreeing = agreement["token_fraction"] * batch * new_tokens
    assert agreeing == pytest.approx(round(agreeing))
    assert sum(first_diff) <= round(agreeing) <= batch * new_tokens - sum(d < new_tokens for d in first_diff)


def test_profile_train_step_runs():
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "profile_train_step.py"), "--tiny",
                         "--steps", "2", "--top", "3"], capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "page faults per step" in proc.stdout and "thread(s) busy" in proc.stdout
  assert "jit(train_step)" in proc.stdout  # the slowest ops, named with their jax operation


def test_ablate_train_step_runs_code_variants_and_xla_options(tmp_path):
  out = tmp_path / "ablate.json"
  proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablate_train_step.py"), "--tiny", "--steps", "2",
                         "--xla-option", "xla_cpu_copy_insertion_use_region_analysis=true", "--json", str(out)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  medians = json.loads(out.read_text())["median_step_s"]
  assert set(medians) == {"as shipped", "autodiff bias gradient", "N-D tensordot projections",
                          "xla_cpu_copy_insertion_use_region_analysis=true"}
  assert all(t > 0 for t in medians.values())


SHARED = REPO.parent / "shared" / "data"
REAL_DATA = REPO / "benchmarks" / "real_data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_real_data_task_files_load(cli, clean_registry):
  """benchmarks/quality.py's task files read the shared data with the carved splits."""
  rc, out, err = cli("tasks", "--tasks-dir", REAL_DATA / "tasks.yaml", "--module", REAL_DATA / "wikitext.py")
  assert rc == 0, err
  rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("real_")}
  assert "train=66,349 validation=1,000" in rows["real_sst2"]  # 67,349 rows, the last 1,000 held out
  assert "train=2,240 validation=250" in rows["real_rte"]
  assert "train=4,043 validation=918" in rows["real_squad"]  # 4,961 questions, split by article
  assert "train=14,041 validation=3,250" in rows["real_conll"]
  assert "train=error" not in out
  for mixture in ("real_supervised", "real_supervised_equal", "real_supervised_proportional", "real_pretrain"):
    assert mixture in rows


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_wikitext_cleaning(clean_registry):
  spec = importlib.util.spec_from_file_location("wikitext_task", REAL_DATA / "wikitext.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # registers real_wikitext (removed by clean_registry)
  assert module.clean("a &lt; unk &gt; b <unk> c") == "a <unk> b <unk> c"
  assert module.clean('the 1 @,@ 000 pre @-@ war &quot;boats&quot; , he said .') == \
      'the 1,000 pre-war "boats", he said.'
  assert module.clean("it does n't ( really )") == "it doesn't (really)"
  docs = list(module.documents(["= Title = First sentence .", "Second .", "", "= = Part = =", "Third ."]))
  assert docs == ["Title. First sentence. Second.", "Part. Third."]
  text = pathlib.Path(module.ensure()).read_text()
  assert "&lt;" not in text and "@-@" not in text and "< unk >" not in text


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data")
def test_text_to_text_task_file_loads(cli, clean_registry, tmp_path, monkeypatch):
  """benchmarks/text_to_text.py's task file reads the shared data with the carved WMT split, and
  formats translation and summarisation examples."""
  monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # it imports its sibling benchmarks
  spec = importlib.util.spec_from_file_location("text_to_text", REPO / "benchmarks" / "text_to_text.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  tasks_yaml = module.write_tasks(str(tmp_path))
  rc, out, err = cli("tasks", "--tasks-dir", tasks_yaml)
  assert rc == 0, err
  rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("t2t_")}
  assert "train=2,500 validation=500" in rows[module.WMT] and "bleu,chrf" in rows[module.WMT]
  assert "train=12,460 validation=500" in rows[module.DIALOGSUM]
  assert module.MIXTURE in rows
  rc, out, err = cli("show", module.WMT, "--tasks-dir", tasks_yaml, "-n", "1", "--split",
                     "validation")
  assert rc == 0, err
  assert out.startswith("[0] inputs (") and "translate English to German: " in out
