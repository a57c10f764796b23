"""benchmarks/record.py: BENCHMARKS.md from results files only. Every section is rendered from a
fabricated results file, with its provenance line, the ratios its table prints and the line beside figures
measured with more ranks than cores; a missing file leaves the command that makes it."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
import record  # noqa: E402

META = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "cores": 2, "date": "2026-12-04T00:00:00Z",
        "commit": "0123456789abcdef0123", "command": ".venv/bin/python benchmarks/x.py", "env": {"OMP_NUM_THREADS": "1"}}
RING = "computed (ring formula)"


def write(folder, name, results):
    (folder / f"{name}.json").write_text(json.dumps({"meta": META, "results": results}))


def curve(points):
    return [{"train_time_s": t, "test_accuracy": a} for t, a in points]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "RESULTS", tmp_path)
    monkeypatch.setattr(record, "read_results", lambda name: common.read_results(name, tmp_path))
    return tmp_path


def test_sections_come_from_their_results_files(results):
    write(results, "kernels", [{"d": 1e6, "threads": 1, "copy_gbs": 10.0, "fused_gbs": 8.0,
                                "fused_fraction_of_limit": 0.53, "speedup_vs_torch": 20.0, "speedup_vs_grace": 5.0,
                                "copy_s": 1e-3, "fused_s": 1.5e-3, "torch_s": 3e-2, "grace_s": 7.5e-3}])
    step = {"median_s": 0.02, "min_s": 0.019, "max_s": 0.03}
    write(results, "step", [{"params": 26_200_000, "tensors": 20, "threads": 1, "stock_sgd_step": step,
                             "ps_blocksign_step": {"median_s": 0.03}, "ratio_to_stock": 1.5, "worker_ratio_to_stock": 1.2,
                             "ratio_to_grace_worker": 0.5, "worker_one_pass_s": 0.9, "worker_two_passes_s": 1.0}])
    write(results, "netem_step", {"clusters": [{"rate": "1gbit", "ranks": 2, "oversubscribed": False},
                                               {"rate": "1gbit", "ranks": 4, "oversubscribed": True}],
                                  "records": [{"topology": t, "compression": c, "ranks": m, "params": 1e6, "rate": "1gbit",
                                               "step_time_median_s": s, "busiest_bytes_per_step": b, "bytes_source": src}
                                              for m in (2, 4) for t, c, s, b, src in (
                                                  ("horovod", "none", 0.04, 8e6, RING),
                                                  ("ps", "blocksign", 0.01, 2.5e5, "measured"))]})
    write(results, "e2e", {"target": 0.9, "epochs": 2, "train_args": "--model mlp", "methods": {"horovod": ["--method", "horovod"]},
                           "clusters": [{"rate": "1gbit", "ranks": 2, "cores": 2, "oversubscribed": False}],
                           "records": [{"label": "horovod", "rate": "1gbit", "ranks": 2, "model": "mlp", "data": "digits",
                                        "step_time_median_s": 0.1, "final_accuracy": 0.95, "busiest_bytes_per_step": 8e6,
                                        "bytes_source": RING, "curve": curve([(5.0, 0.8), (10.0, 0.92)])},
                                       {"label": "ef-blocksgdm-ps", "rate": "1gbit", "ranks": 2, "model": "mlp",
                                        "data": "digits", "step_time_median_s": 0.05, "final_accuracy": 0.93,
                                        "busiest_bytes_per_step": 2.5e5, "bytes_source": "measured",
                                        "curve": curve([(2.5, 0.85), (5.0, 0.91)])}]})
    write(results, "synthetic", {"script_args": ["--model", "resnet18"], "bucket_cap_mb": 10.0,
                                 "contenders": {"horovod": [], "ef-blocksgdm-ps": ["--distef-topology", "ps"],
                                                "ef-blocksgdm-ps-overlap": ["--distef-overlap"]},
                                 "places": [{"where": "local", "ranks": 2, "cores": 2, "oversubscribed": False},
                                            {"where": "1gbit", "ranks": 4, "cores": 2, "oversubscribed": True}],
                                 "records": [{"label": label, "where": where, "ranks": m, "round": i, "img_per_s": v * i}
                                             for where, m in (("local", 2), ("1gbit", 4)) for i in (1, 2)
                                             for label, v in (("horovod", 100.0), ("ef-blocksgdm-ps", 90.0),
                                                              ("ef-blocksgdm-ps-overlap", 120.0))]})
    write(results, "mpi_wait", {"payload_bytes": 1218, "iterations": 50,
                                "rows": [{"horovod_cycle_ms": 1, "blocking_ms": 3.9, "polled_ms": 1.5, "none_ms": 1.4}]})
    link = {"horovod": 8e6, "ps": 5e5, "sharded": 5e5, "hierarchical": 2.5e5, "hierarchical-leaders": 2.5e5}
    write(results, "netem_nodes", {"clusters": [{"rate": "1gbit", "ranks": 4, "ranks_per_node": 2, "oversubscribed": True}],
                                   "records": [{"topology": t, "rate": "1gbit", "ranks": 4, "ranks_per_node": 2,
                                                "params": 1e6, "step_time_median_s": s,
                                                "node_link_bytes_per_step": [[link[t] / 2] * 2, [link[t] / 4] * 2]}
                                               for t, s in (("horovod", 0.04), ("ps", 0.01), ("sharded", 0.012),
                                                            ("hierarchical", 0.008), ("hierarchical-leaders", 0.01))]})
    text = record.build()
    assert "Not measured yet" in text and "step_paths.py" in text  # a file left out
    assert text.count("Results file `benchmarks/results/") == 8  # synthetic feeds two sections
    assert "| 1gbit | 2 x 2 | 1M | hierarchical | 8.0 ms | 0.20x | 250,000 | 0.50x |" in text
    assert ("- 2 x 2, 1M: its step 0.80x the best flat topology's (`ps`), 0.50x flat `sharded`'s bytes on the "
            "node's link; the leaders' path 1.25x the slices' step.") in text
    assert "commit `0123456789ab`; command `.venv/bin/python benchmarks/x.py`; environment: OMP_NUM_THREADS=1" in text
    assert "| 1e+06 | 1 | 10.0 | 8.0 | 53% | 20.0x | 5.0x |" in text
    assert "| 1 | 20.0 ms (19.0-30.0) | 30.0 ms | 1.50x | 1.20x | 0.50x | 0.90x |" in text
    assert "| 2 | ps | blocksign | 10.0 ms | 0.25x | 250,000 | 32.0x |" in text
    assert f"| 2 | horovod | none | 40.0 ms | 1.00x | 8,000,000 [{RING}] | 1.0x |" in text
    assert "**More ranks than cores** (4 ranks on 2 cores)" in text
    assert "| ef-blocksgdm-ps | 50.0 ms | 0.50x | 5.0 s | 0.50x | 93.0% | 250,000 | 32.0x |" in text
    assert "| ef-blocksgdm-ps | 135.0 | 0.90x | 0.90, 0.90 |" in text
    # overlapped over plain step time = plain img/s over overlapped img/s
    assert "| this machine | 2 | 0.75x | 0.75, 0.75 |  |" in text and "| 1gbit links | 4 | 0.75x | 0.75, 0.75 | yes |" in text
    assert "| 1 ms | 3.90 ms | 1.50 ms | 1.40 ms |" in text
    for png in ("kernels.png", "netem_step_1gbit_1M.png", "e2e_1gbit_M2.png"):
        assert (results / png).stat().st_size > 1000


def test_a_benchmark_that_ran_writes_its_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    path = common.write_results("x", {"rows": [1]}, argv=[str(ROOT / ".venv" / "bin" / "python"), "b.py", "--n", "a b"])
    saved = json.loads(path.read_text())
    assert saved["results"] == {"rows": [1]} and saved["meta"]["command"] == ".venv/bin/python b.py --n 'a b'"
    assert saved["meta"]["commit"].split("+")[0] == common.commit().split("+")[0] and saved["meta"]["cores"] >= 1
    assert common.read_results("x", tmp_path) == saved and common.read_results("nothing", tmp_path) is None
