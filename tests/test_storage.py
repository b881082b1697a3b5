"""A full disk (issue 25, item 2): whatever the writer (safetensors, torch.save, a metrics row, results.json), one
line naming the file and what it held, a non-zero exit, `failed` in run.json, and the previous complete checkpoint
kept as the latest, so that resume=auto continues from it once space is freed."""

import errno
import json
import pathlib

import pytest

from conftest import TINY
from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.cli import main
from test_pretrain import train_rows

# What safetensors raises on a full disk (the Rust io error), and what torch.save's zip writer raises.
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
                    'device" })')
TORCH_SAVE_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def fails_with_one_line(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1, err
    assert err.startswith("ntp-rl: error: no space left on the device while writing ") and "\n" not in err, err
    return err


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one_and_resume_continues(tiny, tmp_path, monkeypatch,
                                                                                             capsys):
    import transformers.modeling_utils

    real_save = transformers.modeling_utils.safe_save_file

    def full_at_step_6(tensors, filename, *args, **kwargs):
        if "step_00000006" in str(filename):
            pathlib.Path(filename).write_bytes(b"\0" * 1000)  # what fitted before the disk filled
            raise Exception(SAFETENSORS_FULL)  # safetensors' SafetensorError is an Exception of its own
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_at_step_6)
    run = tmp_path / "run"
    args = ["pretrain", *tiny, f"run_dir={run}"]
    err = fails_with_one_line(args, capsys)
    checkpoints = run / "checkpoints"
    assert err == (f"ntp-rl: error: no space left on the device while writing the checkpoint of step 6 to "
                   f"{checkpoints / '.tmp-step_00000006'}; the previous checkpoint {checkpoints / 'step_00000003'} "
                   "stays the latest: free some space, then resume=auto continues from it")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["error"].startswith("StorageError: no space left on the device")
    assert latest_checkpoint(checkpoints).name == "step_00000003"
    assert not list(checkpoints.glob(".tmp-*")), "the half-written checkpoint is removed: its space is needed"

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real_save)  # space freed
    main([*args, "resume=auto"])
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert "resumed from" in capsys.readouterr().out
    assert sorted(train_rows(run)) == [2, 4, 6]


def test_a_full_disk_while_writing_the_corpus_cache_metrics_or_results_costs_one_line(tmp_path, monkeypatch, capsys):
    import torch

    from ntp_rl import tracking

    cache = tmp_path / "cache"
    common = ["pretrain", *TINY, f"out_dir={tmp_path / 'out'}", f"data.cache_dir={cache}"]

    # the corpus cache (torch.save's zip writer), before any run directory exists
    real_save = torch.save
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", lambda obj, f, *a, **k: (_ for _ in ()).throw(RuntimeError(TORCH_SAVE_FULL)))
        err = fails_with_one_line(common, capsys)
    assert " the corpus cache to " in err and str(cache) in err, err
    assert not list(tmp_path.rglob("run.json")) and not list(cache.glob("*/train.pt"))
    assert torch.save is real_save

    # a metrics row: the third line of metrics.jsonl does not fit
    class FullAfter:
        def __init__(self, file, lines):
            self.file, self.lines = file, lines

        def write(self, text):
            self.lines -= 1
            if self.lines < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    metrics_run = tmp_path / "metrics_run"
    with monkeypatch.context() as patch:
        patch.setattr(tracking, "open", lambda *a, **k: FullAfter(open(*a, **k), 2), raising=False)
        err = fails_with_one_line([*common, f"run_dir={metrics_run}"], capsys)
    assert err == (f"ntp-rl: error: no space left on the device while writing the metrics of step 3 to "
                   f"{metrics_run / 'metrics.jsonl'}; free some space, then resume=auto continues from the last "
                   "complete checkpoint")
    assert json.loads((metrics_run / "run.json").read_text())["status"] == "failed"

    # results.json, at the very end
    real_write_text = pathlib.Path.write_text

    def full_for_results(self, *args, **kwargs):
        if self.name == ".results.json.tmp":
            real_write_text(self, "{\n")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    results_run = tmp_path / "results_run"
    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", full_for_results)
        err = fails_with_one_line([*common, f"run_dir={results_run}"], capsys)
    assert err.startswith(f"ntp-rl: error: no space left on the device while writing results.json to "
                          f"{results_run / 'results.json'}; free some space"), err
    assert json.loads((results_run / "run.json").read_text())["status"] == "failed"
    assert not (results_run / ".results.json.tmp").exists()
    assert latest_checkpoint(results_run / "checkpoints").name == "step_00000006"
