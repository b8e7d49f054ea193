"""results/: the study runner's shell syntax, and the figures redrawn from result files."""
import json
import os
import subprocess
import sys

from PIL import Image

from conftest import REPO


def test_quick_study_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "results" / "quick_study.sh")], check=True)


def write_run(folder, name, summary, log=None, metrics=()):
    run = folder / name
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"summary": summary, "metrics": list(metrics)}))
    if log is not None:
        (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def test_figures_are_drawn_from_result_files(tmp_path):
    study, ser = tmp_path / "study", tmp_path / "ser"
    log = [{"kind": "train", "step": s, "inv": 0.1, "equi": 0.5, "std": 0.7, "pred_std": 0.2,
            "cov": 0.1 * s} for s in (1, 2, 3)]
    log += [{"kind": "online", "step": s, "rot_r2_full": 0.1 * s, "rot_r2_inv": 0.1,
             "rot_r2_equi": 0.2} for s in (2, 3)]
    for seed in (0, 1):
        summary = {"top1/full": 0.2 + seed / 10, "rot_r2_pooled/full": 0.5}
        write_run(study, f"sie-toy-s{seed}", summary, log)
        blocks = [{"name": "equivariance", "part": f"block{b}", "value": 0.9, "chance": 0.8}
                  for b in (1, 2, 3)]
        write_run(ser, f"ser-toy-moco-s{seed}", {}, metrics=blocks)
    out = tmp_path / "assets"
    script = REPO / "results" / "make_figures.py"
    subprocess.run([sys.executable, str(script), "--study", str(study), "--ser", str(ser),
                    "--out", str(out)], check=True)
    names = sorted(os.listdir(out))
    assert names == ["study_methods.png", "study_ser_equivariance.png", "study_sie_curves.png"]
    for name in names:
        with Image.open(out / name) as image:
            assert image.size[0] > 400 and image.getextrema() != ((255, 255),) * 3
