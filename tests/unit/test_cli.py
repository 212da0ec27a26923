"""The `mlecs` command line."""


def test_the_fleet_command_names_a_bad_choice_before_starting_anything():
    from typer.testing import CliRunner

    from mlecs.cli import app

    result = CliRunner().invoke(app, ["fleet", "--codec", "bf16"])
    assert result.exit_code == 2
    assert "--codec" in result.output and "fp32, fp16, int8" in result.output
