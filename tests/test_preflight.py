"""launch.py --print_config and --dry_run: what a run would use, shown without training or writing anything."""
import json
import os
import re

from conftest import ROOT, TINY, launch_cli


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result = launch_cli("--config", os.path.join(ROOT, "configs", "digits.py"), "--print_config",
                        "--config.clustering_use=True", "--config.metric_learn=False", "--config.batch_size=32",
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed["method"] == "cluster" and printed["batch_size"] == 32 and printed["dataset"] == "digits"
    assert not os.listdir(tmp_path)  # not even the default workdir runs/digits/<stamp>


def test_dry_run_summarises_data_model_and_mesh_and_writes_nothing(in_process_launch, capsys, tmp_path):
    assert in_process_launch(["--dry_run", *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dry run: nothing trained, nothing written"
    assert lines[2] == "data: pretrain 1,347, train 1,347, valid 0, test 450 examples; 10 classes"
    assert re.fullmatch(r"model: resnet18 \(width x0.0625\), [\d,]+ parameters \(encoder [\d,]+\) "
                        r"\+ prototype classifier [\d,]+", lines[3]), lines[3]
    assert lines[4:] == ["mesh: 8 cpu device(s) in 1 process(es); global batch 16 = 2 per device",
                         "pretraining: 2 steps per epoch x 2 epochs = 4 steps",
                         f"workdir: {tmp_path / 'run'} (would be created)"]
    assert not os.listdir(tmp_path)
