"""`t5mix import-hf` / `export-hf` through the CLI, and fine-tuning an imported model."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from t5mix import cli, config as config_lib, definitions, train
from t5mix.hf_interop import save_hf_checkpoint
from t5mix.model import T5, T5Config
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
  assert cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "wd")]) == 0
  assert "fine-tune with" in capsys.readouterr().out
  assert cli.main(["export-hf", "--workdir", str(tmp_path / "wd"), "--out", str(tmp_path / "back")]) == 0
  original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
  assert original.keys() == back.keys()
  for name in original:
    np.testing.assert_array_equal(original[name], back[name])
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
