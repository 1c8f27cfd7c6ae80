"""launch.py end to end as a command: --help, a missing config file, and one-line errors with exit status 2
and no files for a few kinds of bad input (every kind is checked in-process in test_config_validation)."""
import pytest

from conftest import launch_cli


def test_help_documents_flags():
    result = launch_cli("--help")
    assert result.returncode == 0
    for flag in ("--config", "--workdir", "--coordinator_address", "--num_processes", "--process_id",
                 "--print_config", "--dry_run"):
        assert flag in result.stdout
    assert "every config option, each with a comment, in configs/default.py" in result.stdout
    assert "README.md" in result.stdout


@pytest.mark.parametrize("overrides,message", [
    (["--config.batch_siz=3"], "unknown config key 'batch_siz'"),
    (["--config.batch_size=12"], "batch_size=12; valid: a multiple of the global device count 8"),
    (["--config.num_prototypes=5000"], "num_prototypes=5000; valid: at most the pretrain set size 1347"),
    (["--config.num_prototypes=1347", "--config.pca_dim=0"],
     "num_prototypes=1347; valid: at most 1346, one less than the pretrain set size 1347 (spcl pairs two images"),
    (["--config.batch_size=4096"], "batch_size=4096; valid: at most the training set size 1347"),
], ids=["unknown key", "device count", "prototypes vs data", "one image per prototype", "batch vs data"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    result = launch_cli("--config", "configs/digits.py", f"--workdir={workdir}", *overrides, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0] == f"launch.py: error: {lines[0].removeprefix('launch.py: error: ')}"
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not workdir.exists()


def test_missing_config_file(tmp_path):
    result = launch_cli("--config", "configs/nope.py", f"--workdir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("launch.py: error: config file 'configs/nope.py' not found; "
                                     "valid: a file like configs/digits.py")
    assert not (tmp_path / "run").exists()
