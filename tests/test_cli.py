"""The command line as a user meets it, without Ray: every command listed, mistakes answered in one line, exit 2."""

import time

import pytest

from conftest import run_cli
from happysad import synth
from happysad.cli import build_parser

JPEG = next(s.data for s in (synth.sample(5, i) for i in range(10)) if s.extension == "jpg")


def test_help_lists_every_command():
    result = run_cli("--help")
    commands = build_parser().parse_args(["make-data", "--out", "x", "--n", "1"]).commands
    first_line = result.stdout.split("\n\n")[1].replace("\n", " ")
    assert result.returncode == 0 and all(name in first_line for name in commands), first_line


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["score", "--input", "a.jpg", "b.jpg", "--output", "out"], "unrecognized arguments: b.jpg (repeat --input for each one"),
        (["score", "--input=a.jpg", "b.jpg", "c.jpg", "--output", "out"], "unrecognized arguments: b.jpg c.jpg (repeat --input"),
        (["evaluate", "--data", "a", "b", "--output", "out"], "unrecognized arguments: b (repeat --data for each one"),
        (["train", "--epochs", "2", "stray"], "unrecognized arguments: stray"),
    ],
)
def test_a_second_value_after_a_repeatable_flag_says_to_repeat_it(args, said):
    result = run_cli(*args)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2 and line.startswith(f"happysad {args[0]}: error: {said}"), line
    assert ("repeat" in said) == ("repeat" in line)


@pytest.mark.parametrize("what", ["missing", "folder"])
def test_predict_of_a_name_that_is_not_a_file_exits_2_like_explain(model_file, tmp_path, what):
    (tmp_path / "ok.jpg").write_bytes(JPEG)
    target = tmp_path / ("nope.jpg" if what == "missing" else "")
    started = time.monotonic()
    for command in ("predict", "explain"):
        extra = ["--out", str(tmp_path / "cams")] if command == "explain" else []
        result = run_cli(command, "--model", str(model_file), *extra, str(tmp_path / "ok.jpg"), str(target))
        assert result.returncode == 2, result.stderr
        reason = "no such file" if what == "missing" else "not a file"
        assert result.stderr.strip().splitlines() == [f"happysad {command}: error: IMAGE {target}: {reason}"]
    assert time.monotonic() - started < 30  # refused before the model loads


NO_RAY = "127.0.0.1:9"  # nothing listens: a command that tried to start or join Ray would fail


def without_ray() -> dict:
    import os

    return dict(os.environ, RAY_ADDRESS=NO_RAY)


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_typo_in_data_is_answered_before_ray(command, model_file, tmp_path):
    extra = ["--model", str(model_file), "--output", str(tmp_path / "eval")] if command == "evaluate" else []
    result = run_cli(command, "--data", str(tmp_path / "typo"), *extra, env=without_ray())
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"happysad {command}: error: --data {tmp_path / 'typo'}: no such folder or prefix"
    ]


def test_an_empty_input_warns_and_nothing_to_score_starts_no_ray(model_file, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("score", "--model", str(model_file), "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out"),
                     env=without_ray())
    assert result.returncode == 0, result.stderr
    assert f"warning: --input {tmp_path / 'empty'}: no files in it" in result.stderr
    assert "scored 0 inputs in " in result.stdout and "; 0 rows in all: 0 happy, 0 sad;" in result.stdout
