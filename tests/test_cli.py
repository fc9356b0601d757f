"""The command line: subcommands other than train (train is covered by test_config/test_train)."""
import pytest

from commtrain.cli import main


def test_schedule_prints_the_grid(capsys):
    assert main(["schedule", "--schedule", "1f1b", "--pp", "4", "--microbatches", "6"]) == 0
    out = capsys.readouterr().out
    assert "schedule completes in" in out and "stage 3" in out and "F5" in out and "bubble:" in out


def test_schedule_rejects_unknown_name():
    with pytest.raises(ValueError, match="zigzag"):
        main(["schedule", "--schedule", "zigzag"])


def test_compare_writes_table_and_plot(tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", "--model", "gpt-nano", "--hardware", "rtx3090-pcie,dgx1-v100",
                 "--codecs", "none,quant:bits=4,group=128", "--seq-len", "128", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "rtx3090-pcie" in out and "dgx1-v100" in out and "tokens/s" in out
    assert png.stat().st_size > 10_000
