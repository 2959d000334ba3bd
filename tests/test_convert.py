"""`t5mix import-hf` / `export-hf` through the CLI, and fine-tuning an imported model."""

import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from t5mix import cli, config as config_lib, definitions, train
from t5mix.checkpoints import load_workdir_params
from t5mix.hf_interop import save_hf_checkpoint
from t5mix.model import T5, T5Config
from t5mix.vocab import DEMO_VOCAB
from flax import nnx

SIZES = dict(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
             num_decoder_layers=2, relative_attention_num_buckets=8,
             relative_attention_max_distance=20, dropout_rate=0.0)


@pytest.fixture
def hf_dir(tmp_path):
  """A random T5 v1.1 in HuggingFace layout (written by our exporter, checked against HF elsewhere)."""
  config = T5Config(**SIZES)
  save_hf_checkpoint(T5(config, rngs=nnx.Rngs(3)), config, tmp_path / "hf")
  return tmp_path / "hf"


def test_import_export_round_trip_through_the_cli(hf_dir, tmp_path, capsys):
  wd = tmp_path / "wd"
  assert cli.main(["import-hf", str(hf_dir), "--out", str(wd)]) == 0
  assert capsys.readouterr().out == (  # hf_dir has no spiece.model
      f"wrote {wd}/checkpoints/0; fine-tune with: t5mix train --init-from {wd} --set data.mixture=NAME "
      f"--workdir RUN (the model comes from {wd}; name its vocabulary with --vocab FILE.model)\n")
  assert cli.main(["export-hf", "--workdir", str(wd), "--out", str(tmp_path / "back")]) == 0
  original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
  assert original.keys() == back.keys()
  for name in original:
    np.testing.assert_array_equal(original[name], back[name])
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE((tmp_path / "back" / "model.safetensors").stat().st_mode) == 0o666 & ~umask
  # Importing into a workdir that already has checkpoints is refused, without touching it.
  assert cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "wd")]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err


def test_fine_tune_an_imported_model(hf_dir, tmp_path):
  definitions.load()
  cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "wd")])
  c = config_lib.load(None, [f"model={tmp_path / 'wd' / 'model.yaml'}", "steps=3",
                             "data.mixture=demo_supervised", "data.batch_size=4",
                             "data.inputs_length=32", "data.targets_length=8"])
  lines = []
  summary = train.train(c, str(tmp_path / "ft"), init_from=str(tmp_path / "wd"), log=lines.append)
  assert summary["step"] == 3
  assert any("initialised parameters from" in line for line in lines)


def test_bad_inputs(tmp_path, capsys):
  assert cli.main(["import-hf", str(tmp_path / "nope"), "--out", str(tmp_path / "wd")]) == 2
  assert cli.main(["export-hf", "--workdir", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err
  assert "not a t5mix workdir" in err


def test_import_a_corrupt_safetensors_file(hf_dir, tmp_path, capsys, expect_error):
  (hf_dir / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
  rc = cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "wd")])
  expect_error(rc, capsys.readouterr().err, f"{hf_dir}/model.safetensors: not a readable safetensors file (")
  assert not (tmp_path / "wd").exists()


def hub_cache(cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
  """Lays out `files` (name -> path) as huggingface_hub caches a download of `repo_id` at main."""
  repo = cache / f"models--{repo_id.replace('/', '--')}"
  (repo / "blobs").mkdir(parents=True)
  (repo / "snapshots" / commit).mkdir(parents=True)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)
  for name, path in files.items():
    blob = hashlib.sha256(path.read_bytes()).hexdigest()
    shutil.copyfile(path, repo / "blobs" / blob)
    (repo / "snapshots" / commit / name).symlink_to(f"../../blobs/{blob}")


def run_offline(argv, env, cwd):
  """The CLI in its own process: huggingface_hub reads HF_* variables when it is imported."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HUB_OFFLINE": "1", **env}
  return subprocess.run([sys.executable, "-m", "t5mix.cli", *map(str, argv)], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_import_a_hub_name_from_the_cache_offline(hf_dir, tmp_path):
  home = tmp_path / "hf_home"
  hub_cache(home / "hub", "t5mix-tests/tiny-t5", {"config.json": hf_dir / "config.json",
                                                  "model.safetensors": hf_dir / "model.safetensors",
                                                  "spiece.model": pathlib.Path(DEMO_VOCAB)})
  run = run_offline(["import-hf", "t5mix-tests/tiny-t5", "--out", "wd"], {"HF_HOME": str(home)}, tmp_path)
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith("wrote ")
  assert (tmp_path / "wd" / "spiece.model").read_bytes() == pathlib.Path(DEMO_VOCAB).read_bytes()
  config, model = load_workdir_params(str(tmp_path / "wd"))
  assert config == T5Config(**SIZES)
  np.testing.assert_array_equal(model.embedding[...],
                                load_file(hf_dir / "model.safetensors")["shared.weight"])


def test_import_an_uncached_hub_name_offline(tmp_path, expect_error):
  cache = tmp_path / "hub"
  cache.mkdir()
  run = run_offline(["import-hf", "google/flan-t5-small", "--out", "wd"], {"HF_HUB_CACHE": str(cache)},
                    tmp_path)
  expect_error(run.returncode, run.stderr, "google/flan-t5-small: ", str(cache),
               "huggingface-cli download google/flan-t5-small", "local checkpoint directory")
  assert not (tmp_path / "wd").exists()
