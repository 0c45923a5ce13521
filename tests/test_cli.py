import subprocess
import sys

import pytest

from mmearth_jax import cli

FLAGS = {
    "synth": ["--out", "--n", "--size", "--seed", "--scene-variation"],
    "convert": ["--src", "--out", "--shards", "--workers", "--split", "--modalities", "--compression"],
    "verify": ["dir"],
    "inspect": ["dir", "--batches", "--batch", "--input", "--outputs"],
    "train": ["--config", "--workdir", "--coordinator", "--num-processes", "--process-id"],
    "embed": ["--checkpoint", "--scene", "--images", "--channels-first", "--out", "--pool",
              "--bands", "--tile", "--overlap", "--mask-band", "--no-progress", "--normalised",
              "--level", "--scale", "--offset", "--gsd", "--batch-size"],
    "segment-scene": ["--model", "--scene", "--out", "--bands", "--tile", "--overlap",
                      "--mask-band", "--no-progress", "--normalised", "--level", "--scale",
                      "--offset", "--batch-size"],
    "knn": ["--checkpoint", "--dataset", "--data-dir", "--train-split", "--test-split",
            "--partition", "--max-examples", "--image-size", "--bands", "--batch-size", "--json",
            "--scales", "--gsd", "--k"],
    "segment": ["--config"],
    "to-torch": ["--checkpoint", "--layout", "--out", "--check"],
    "from-torch": ["--checkpoint", "--out", "--model", "--bands", "--band-stats"],
    "info": ["checkpoint", "--json"],
}
FLAGS["probe"] = [f for f in FLAGS["knn"] if f != "--k"] + ["--kind"]


def subparser(command):
  return cli.build_parser()._subparsers._group_actions[0].choices[command]


def test_every_command_is_covered():
  assert sorted(FLAGS) == sorted(c.name for c in cli.COMMANDS)


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_help_explains_every_flag(command, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  text = capsys.readouterr().out
  for flag in FLAGS[command]:
    assert flag in text, flag
  sub = subparser(command)
  for action in sub._actions:
    if action.dest != "help":
      assert action.help, f"{command} {action.dest} has no help text"
  # Exactly these flags: none added or lost in the reshape.
  names = {s for a in sub._actions for s in (a.option_strings or [a.dest])} - {"-h", "--help"}
  assert names == set(FLAGS[command])


def test_shared_flags_have_one_definition():
  for command in (cli.KNN, cli.PROBE):
    assert all(any(a is b for b in command.arguments) for a in (cli.CHECKPOINT, *cli.EVAL_DATA))
  helps = {subparser(c)._option_string_actions["--data-dir"].help for c in ("knn", "probe")}
  assert len(helps) == 1 and "TFDS data_dir" in helps.pop()
  assert subparser("segment")._option_string_actions["--config"].default == "segment"


def test_no_prefix_matching():
  parser = cli.build_parser()
  assert parser.allow_abbrev is False
  assert all(subparser(c).allow_abbrev is False for c in FLAGS)


def test_a_flag_prefix_is_refused_not_expanded(capsys):
  # With prefix matching, --k would be read as probe's --kind ("evaluators ['10', '20'] unknown").
  with pytest.raises(SystemExit) as e:
    cli.main(["probe", "--checkpoint", "run", "--dataset", "geobench:x", "--k", "10,20"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert "unrecognized arguments: --k 10,20" in err and "evaluators" not in err
  with pytest.raises(SystemExit):
    cli.main(["knn", "--checkpoint", "run", "--data", "geobench:x"])  # not --dataset / --data-dir


def test_overrides_belong_to_train_and_segment(capsys):
  assert cli.main(["knn", "--checkpoint", "run", "--dataset", "geobench:x", "--config.k=1"]) == 2
  assert ("mmearth-jax knn: error: --config.* overrides belong to `train` and `segment`"
          in capsys.readouterr().err)
  assert cli.main(["synth", "--out", "x", "--config.n=1"]) == 2
  assert "mmearth-jax synth: error: --config.* overrides" in capsys.readouterr().err
  assert cli.main(["train", "--config", "mp_mae:demo", "--workdir", "w", "--config.k"]) == 2
  assert "mmearth-jax: error: --config.k needs a value" in capsys.readouterr().err


def test_segment_names_an_unknown_config_key(capsys):
  assert cli.main(["segment", "--config", "segment:demo", "--config.stepz=3"]) == 2
  err = capsys.readouterr().err
  assert "mmearth-jax segment: error: config has no key 'stepz'" in err and "steps" in err
  assert cli.main(["segment", "--config", "segment:tiny"]) == 2
  assert "unknown variant 'tiny'" in capsys.readouterr().err
  assert cli.main(["segment", "--config.steps=1.5"]) == 2  # typed: steps is an int
  assert "steps='1.5'" in capsys.readouterr().err


def test_from_torch_help_lists_what_the_importer_accepts():
  from mmearth_jax.interop import hub
  text = subparser("from-torch")._option_string_actions["--model"].help
  for name in (*hub.ARCHS, *hub._OPTIONS):
    assert name in text, name
  for example in ("vit:num_heads=8", "mae:num_heads=8,decoder_num_heads=4", ":num_heads=8",
                  "convnextv2:patch_size=16", "vit:drop_pos_embed=1"):
    hub.parse_model(example)  # every option the help names parses


def test_the_cli_imports_neither_jax_nor_torch():
  code = ("import sys, mmearth_jax.cli as c; c.build_parser(); "
          "sys.exit(bool({'jax', 'torch'} & set(sys.modules)))")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0


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
