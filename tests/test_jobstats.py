"""Per-rule wall time and peak memory from Snakemake's benchmark records (braid.jobstats)."""

from __future__ import annotations

import pandas as pd

from braid import jobstats

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def record(path, s, rss):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{s}\t0:00:{int(s):02d}\t{rss}\t1\t1\t1\t0\t0\t50\t{s / 2}\n")


def test_records_are_summed_and_maximised_per_rule(tmp_path):
    root = tmp_path / "logs" / "benchmark"
    record(root / "betas_mask" / "subj01" / "betas.tsv", 12.5, 900.0)
    record(root / "betas_mask" / "subj02" / "betas.tsv", 7.5, 1400.0)
    record(root / "encoder_train" / "subj01" / "mlp" / "train.tsv", 40.0, 300.0)
    (root / "empty").mkdir()
    jobs = jobstats.jobs(tmp_path)
    assert sorted(jobs["job"]) == ["subj01/betas", "subj01/mlp/train", "subj02/betas"]
    table = jobstats.by_rule(jobs)
    expected = pd.DataFrame({"rule": ["encoder_train", "betas_mask"], "jobs": [1, 2], "total_s": [40.0, 20.0],
                             "max_s": [40.0, 12.5], "max_rss_mb": [300.0, 1400.0]})
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert jobstats.main([str(tmp_path)]) == 0
    written = pd.read_csv(tmp_path / "results" / "job_resources.csv")
    assert list(written["rule"]) == ["encoder_train", "betas_mask"] and written["max_rss_mb"].tolist() == [300.0, 1400.0]


def test_no_records_is_an_error_not_an_empty_table(tmp_path, capsys):
    assert jobstats.main([str(tmp_path)]) == 1
    assert "run the workflow first" in capsys.readouterr().err
