"""Command-line checks of `dreamerv4` (src/dreamerv4/cli.py): help, and config mistakes that must end
in one clear line on stderr and exit status 2 before anything heavy runs.

    pytest tests/test_cli.py -q -x
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dreamerv4.cli import main

# Config-reading commands, each with the arguments it needs besides --config.
CONFIG_COMMANDS = [["run"], ["train", "tokenizer"], ["train", "tokenizer", "--resume"]]


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


def test_help_lists_every_command_without_importing_torch():
    script = ("import sys\nfrom dreamerv4.cli import main\ntry:\n    main(['--help'])\n"
              "except SystemExit as exc:\n    print('exit', exc.code, 'torch imported:', 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("exit 0 torch imported: False")
    for command in ("run", "data", "train", "eval", "info"):
        assert f"    {command} " in result.stdout, command


def test_module_entry_point_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "dreamerv4.cli", "train", "tokenizer", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "--resume" in result.stdout and "key=value" in result.stdout


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_unknown_override_key_exits_2_naming_the_key(command, tmp_path, capsys):
    config = tmp_path / "ok.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run")}))
    code, err = run_main([*command, "--config", str(config), "tokenizer.train.stepz=3"], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "'stepz'" in err and "tokenizer.train" in err and "steps" in err  # names the key, lists valid ones
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_unknown_key_in_the_file_exits_2_naming_file_and_key(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"tokenizer": {"modle": {"patch_size": 8}}}))
    code, err = run_main(["train", "tokenizer", "--config", str(config)], capsys)
    assert code == 2
    assert str(config) in err and "'modle'" in err


def test_wrong_value_type_exits_2_naming_the_key(tmp_path, capsys):
    config = tmp_path / "ok.yaml"
    config.write_text("{}\n")
    code, err = run_main(["run", "--config", str(config), "tokenizer.train.batch_size=many"], capsys)
    assert code == 2
    assert "tokenizer.train.batch_size" in err and "many" in err


def test_override_without_equals_sign_exits_2(tmp_path, capsys):
    config = tmp_path / "ok.yaml"
    config.write_text("{}\n")
    code, err = run_main(["train", "tokenizer", "--config", str(config), "tokenizer.train.steps"], capsys)
    assert code == 2
    assert "tokenizer.train.steps" in err and "key=value" in err


@pytest.mark.parametrize("command", CONFIG_COMMANDS)
def test_missing_config_file_exits_2_naming_it(command, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, err = run_main([*command, "--config", str(missing)], capsys)
    assert code == 2
    assert err == f"error: {missing}: config file not found\n"


def test_config_that_is_not_a_mapping_exits_2(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- just\n- a list\n")
    code, err = run_main(["run", "--config", str(config)], capsys)
    assert code == 2
    assert str(config) in err and "mapping" in err


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: dreamerv4" in capsys.readouterr().err


def test_tokenizer_training_with_missing_data_exits_2_naming_the_folder(tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"), "data": {"path": str(tmp_path / "none")}}))
    code, err = run_main(["train", "tokenizer", "--config", str(config)], capsys)
    assert code == 2
    assert str(Path(tmp_path / "none")) in err
