"""bench/bench_gpu.py, the one command a GPU session runs, end to end on the CPU at tiny shapes (--tiny): every
kind of stage (the training and generation benchmarks, the main job, the profile) runs and reports."""

import sys

import pytest

from conftest import ROOT, superni_slice

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_at_tiny_shapes(demo_model_dir, tmp_path):
    import bench_gpu

    out = tmp_path / "out"
    bench_gpu.main(["--out", str(out), "--tiny", "--data", str(superni_slice()), "--tokenizer-from", str(demo_model_dir),
                    "--work", str(tmp_path / "work"), "--only", "train-demo,job-eager,generate-demo,profile-1b"])
    summary = (out / "summary.md").read_text()
    for stage in ("train-demo", "job-eager", "generate-demo", "profile-1b"):
        assert f"## {stage}: exit 0" in summary, summary
        assert (out / f"{stage}.log").is_file()
    assert "ours / PEFT LoRA tokens/s" in summary and "BADIT / LoRA step time" in summary
    assert "| **average** |" in summary and "done in" in summary  # the main job's table and time
    assert "ratio (ours/hf)" in summary and "launches:" in summary
    assert "cuda-tests" not in summary  # --only
    with pytest.raises(SystemExit):  # never into a folder that holds files
        bench_gpu.main(["--out", str(out), "--tiny"])
