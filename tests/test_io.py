"""Atomic writes: the destination holds either the old or the new content, never a partial file."""

import json

import numpy as np
import pytest

from sharpscope import io
from sharpscope.errors import SharpscopeError, unknown_name_error


def test_write_json_roundtrip_with_numpy_and_nan(tmp_path):
    path = io.write_json(tmp_path / "a" / "r.json", {"x": np.float32(1.5), "v": np.arange(3), "bad": float("nan")})
    assert json.loads(path.read_text()) == {"x": 1.5, "v": [0, 1, 2], "bad": None}


def test_failed_write_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "result.json"
    io.write_json(target, {"old": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_npz_and_jsonl(tmp_path):
    io.write_npz(tmp_path / "a.npz", loss=np.ones((2, 3)))
    assert np.load(tmp_path / "a.npz")["loss"].shape == (2, 3)
    io.append_jsonl(tmp_path / "m.jsonl", {"epoch": 1})
    io.append_jsonl(tmp_path / "m.jsonl", {"epoch": 2})
    assert [json.loads(line)["epoch"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == [1, 2]


def test_prepare_out_dir_refuses_to_overwrite(tmp_path):
    (tmp_path / "surface.npz").write_bytes(b"x")
    with pytest.raises(SharpscopeError, match="already holds surface.npz; pass --overwrite"):
        io.prepare_out_dir(tmp_path, outputs=["surface.npz"], overwrite=False)
    assert io.prepare_out_dir(tmp_path, outputs=["surface.npz"], overwrite=True) == tmp_path
    (tmp_path / "file").write_text("")
    with pytest.raises(SharpscopeError, match="is a file"):
        io.prepare_out_dir(tmp_path / "file", outputs=[], overwrite=False)


def test_unknown_name_suggests_close_matches():
    message = str(unknown_name_error("model", "resnet2O", ["resnet20", "resnet32", "mlp"]))
    assert "did you mean" in message and "'resnet20'" in message and "choices: mlp, resnet20, resnet32" in message
    assert "did you mean" not in str(unknown_name_error("model", "zzz", ["mlp"]))


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        io.write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(umask)
    mode = lambda name: (tmp_path / name).stat().st_mode & 0o777  # noqa: E731
    assert mode("a.txt") == mode("b.txt") == 0o644


def test_prepare_out_dir_removes_what_a_killed_writer_left(tmp_path, monkeypatch):
    (tmp_path / ".surface.k2j_9x0a.tmp.npz").write_bytes(b"half")
    (tmp_path / "surface.npz").write_bytes(b"kept")
    (tmp_path / ".hidden-but-not-temporary").write_bytes(b"kept")
    monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 cleans: another rank may be writing
    io.prepare_out_dir(tmp_path, outputs=[], overwrite=False)
    assert (tmp_path / ".surface.k2j_9x0a.tmp.npz").exists()
    monkeypatch.delenv("RANK")
    io.prepare_out_dir(tmp_path, outputs=[], overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden-but-not-temporary", "surface.npz"]


def test_only_atomic_temporaries_count_as_temporary(tmp_path):
    seen = []
    with io.atomic_path(tmp_path / "surface.npz") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    with io.atomic_path(tmp_path / "README") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert all(io.is_temporary(name) for name in seen), seen
    # a run folder named by mkdtemp ("tmp1ce_rggb") inside a result's name is not a temporary
    for name in (".warm-start.tmp1ce_rggb.tmp1ce_rggb_final.pt", "surface.tmp.npz", ".tmp", "a.abcdefgh.tmp.npz"):
        assert not io.is_temporary(name), name


def test_a_failed_command_leaves_no_empty_out_folder(tmp_path):
    """The folders prepare_out_dir created (out and its new parents) go again when the command fails before
    writing anything; a folder that existed before, or holds files, stays."""
    from click.testing import CliRunner

    from sharpscope.cli.main import cli

    trained = CliRunner().invoke(cli, ["-q", "train", "--model", "mlp", "--epochs", "1", "--device", "cpu",
                                       "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "new" / "deeper" / "out"
    # fails inside the first measure, after --out was prepared: 8-sample chunks of a 1-sample set
    failed = CliRunner().invoke(cli, ["-q", "sharpness", str(tmp_path / "run" / "final.pt"), "--num-samples", "1",
                                      "--m", "8", "--out", str(out)])
    assert failed.exit_code == 1 and "larger than the evaluation set" in failed.output, failed.output
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    failed = CliRunner().invoke(cli, ["-q", "sharpness", str(tmp_path / "run" / "final.pt"), "--num-samples", "1",
                                      "--m", "8", "--out", str(kept)])
    assert failed.exit_code == 1 and kept.is_dir()
