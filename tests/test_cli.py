import subprocess
import sys

import pytest

from mmearth_jax import cli

FLAGS = {
    "synth": ["--out", "--n", "--size", "--seed"],
    "convert": ["--src", "--out", "--shards", "--workers", "--split", "--modalities", "--compression"],
    "verify": ["dir"],
    "inspect": ["dir", "--batches", "--batch", "--input", "--outputs"],
}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_explains_every_flag(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in FLAGS[command]:
    assert flag in text, flag
  parser = cli.build_parser()
  sub = parser._subparsers._group_actions[0].choices[command]
  for action in sub._actions:
    if action.dest != "help":
      assert action.help, f"{command} {action.dest} has no help text"


def test_module_entry_point_runs():
  out = subprocess.run([sys.executable, "-m", "mmearth_jax", "--help"], capture_output=True, text=True)
  assert out.returncode == 0
  for command in FLAGS:
    assert command in out.stdout


def test_synth_convert_verify_inspect_end_to_end(tmp_path, capsys):
  src, out = str(tmp_path / "h5"), str(tmp_path / "shards")
  assert cli.main(["synth", "--out", src, "--n", "8", "--size", "64", "--seed", "3"]) == 0
  assert cli.main(["convert", "--src", src, "--out", out, "--shards", "2"]) == 0
  assert cli.main(["verify", out]) == 0
  assert cli.main(["inspect", out, "--batches", "1", "--batch", "4"]) == 0
  text = capsys.readouterr().out
  assert "OK, 2 shards, 8 records" in text
  assert "image (4, 56, 56, 12) float32" in text and "finite True" in text
  assert cli.main(["synth", "--out", src, "--size", "64", "--n", "0"]) == 2
  assert "--n must be positive" in capsys.readouterr().err
