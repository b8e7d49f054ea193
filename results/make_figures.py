"""The study's figures, drawn with PIL (it ships with torchvision) from the committed result files:

    python results/make_figures.py                      # writes assets/study_*.png

- assets/study_sie_curves.png: one SIE run's loss terms and the online monitor's rotation R² per
  part over training (results/study/<run>/log.jsonl);
- assets/study_methods.png: per-method bars of top-1 and pooled rotation R², mean over seeds
  (results/study/*/eval.json);
- assets/study_ser_equivariance.png: SER's Δ-equivariance per block for each configuration, mean
  over seeds (results/ser-toy/*/eval.json).
A run directory name ending in -s<seed> is one seed of the configuration named by the rest.
`--loss-table` also prints, per SIE run, the unweighted loss terms averaged over its last 10 log lines.
"""
import argparse
import glob
import json
import os
import re

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
FONT = ImageFont.load_default()


# ---- reading the result files ----
def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def configuration(run_dir):
    """'sie-toy-s1' -> 'sie-toy': the name without its seed suffix."""
    return re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def mean(values):
    return sum(values) / len(values)


def summaries_by_configuration(pattern):
    """{configuration: [eval.json summary of each seed]} for the run dirs matching pattern."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(pattern, "eval.json"))):
        with open(path) as f:
            result = json.load(f)
        groups.setdefault(configuration(os.path.dirname(path)), []).append(result)
    return groups


# ---- a minimal plot: axes, ticks, lines, bars, a legend ----
class Plot:
    """One panel with data coordinates mapped into a pixel box of an image."""

    def __init__(self, draw, box, x_range, y_range, title, x_label, y_label):
        self.draw, self.box = draw, box
        self.x_range, self.y_range = x_range, y_range
        left, top, right, bottom = box
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left, top - 14), title, fill=(0, 0, 0), font=FONT)
        x_label_at = (left + (right - left) // 2 - 20, bottom + 16)
        draw.text(x_label_at, x_label, fill=(0, 0, 0), font=FONT)
        draw.text((left - 45, top - 14), y_label, fill=(0, 0, 0), font=FONT)
        for i in range(5):                                   # 5 y ticks with their values
            value = y_range[0] + (y_range[1] - y_range[0]) * i / 4
            y = self.y(value)
            draw.line((left - 3, y, left, y), fill=(0, 0, 0))
            draw.text((left - 40, y - 5), f"{value:.2f}", fill=(0, 0, 0), font=FONT)
        if x_label:                                          # the x range's two ends
            draw.text((left, bottom + 3), f"{x_range[0]:g}", fill=(0, 0, 0), font=FONT)
            draw.text((right - 24, bottom + 3), f"{x_range[1]:g}", fill=(0, 0, 0), font=FONT)

    def x(self, value):
        left, _, right, _ = self.box
        low, high = self.x_range
        return left + (value - low) / (high - low or 1) * (right - left)

    def y(self, value):
        _, top, _, bottom = self.box
        low, high = self.y_range
        return bottom - (value - low) / (high - low or 1) * (bottom - top)

    def line(self, xs, ys, colour):
        points = [(self.x(a), self.y(b)) for a, b in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=2)

    def bar(self, x_left, x_right, height, colour):
        self.draw.rectangle((self.x(x_left), self.y(height), self.x(x_right), self.y(0)),
                            fill=colour)

    def legend(self, names):
        left, top, _, _ = self.box
        for i, name in enumerate(names):
            y = top + 6 + 12 * i
            self.draw.rectangle((left + 6, y, left + 14, y + 8), fill=COLOURS[i % len(COLOURS)])
            self.draw.text((left + 18, y - 2), name, fill=(0, 0, 0), font=FONT)


def value_range(values, pad=0.05):
    low, high = min(values), max(values)
    margin = (high - low) * pad or 0.1
    return low - margin, high + margin


# ---- the figures ----
def sie_curves(log_path, out_png):
    """Loss terms (left) and the online rotation R² per part (right) over training."""
    log = read_jsonl(log_path)
    train = [e for e in log if e["kind"] == "train"]
    online = [e for e in log if e["kind"] == "online"]
    terms = ["inv", "equi", "std", "pred_std", "cov"]
    parts = [k[len("rot_r2_"):] for k in online[0] if k.startswith("rot_r2_")]
    image = Image.new("RGB", (900, 340), "white")
    draw = ImageDraw.Draw(image)
    steps = [e["step"] for e in train]
    loss_values = [e[t] for e in train for t in terms]
    left = Plot(draw, (60, 30, 430, 300), (0, max(steps)), value_range(loss_values),
                "SIE loss terms (unweighted)", "step", "")
    for i, term in enumerate(terms):
        left.line(steps, [e[term] for e in train], COLOURS[i])
    left.legend(terms)
    online_steps = [e["step"] for e in online]
    r2_values = [e[f"rot_r2_{p}"] for e in online for p in parts]
    right = Plot(draw, (510, 30, 880, 300), (0, max(online_steps)), value_range(r2_values),
                 "online monitor: rotation R2 per part (training pairs)", "step", "")
    for i, part in enumerate(parts):
        right.line(online_steps, [e[f"rot_r2_{part}"] for e in online], COLOURS[i])
    right.legend(parts)
    image.save(out_png)


def method_bars(pattern, out_png, metrics=("top1/full", "rot_r2_pooled/full")):
    """One panel per metric: a bar per configuration, the mean over its seeds (dots: each seed)."""
    groups = summaries_by_configuration(pattern)
    names = sorted(groups)
    image = Image.new("RGB", (460 * len(metrics), 380), "white")
    draw = ImageDraw.Draw(image)
    for m, metric in enumerate(metrics):
        seeds = {name: [r["summary"][metric] for r in groups[name] if metric in r["summary"]]
                 for name in names}
        shown = [name for name in names if seeds[name]]
        if not shown:
            continue
        top = max(max(values) for values in seeds.values() if values)
        plot = Plot(draw, (60 + 460 * m, 30, 430 + 460 * m, 280), (0, len(shown)),
                    (0, top * 1.1), f"{metric}, mean over seeds", "", "")
        for i, name in enumerate(shown):
            plot.bar(i + 0.15, i + 0.85, mean(seeds[name]), COLOURS[i % len(COLOURS)])
            for value in seeds[name]:
                x, y = plot.x(i + 0.5), plot.y(value)
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 0, 0))
            draw.text((plot.x(i + 0.1), 288 + 12 * (i % 6)), name, fill=(0, 0, 0), font=FONT)
    image.save(out_png)


def ser_equivariance(pattern, out_png):
    """Δeq (the value minus its no-ρ reference) per block, one line per configuration."""
    groups = summaries_by_configuration(pattern)
    curves = {}
    for name, results in groups.items():
        per_seed = []
        for result in results:
            blocks = {int(r["part"][len("block"):]): r["value"] - r["chance"]
                      for r in result["metrics"] if r["name"] == "equivariance"}
            per_seed.append([blocks[b] for b in sorted(blocks)])
        curves[name] = [mean(values) for values in zip(*per_seed)]
    depth = max(len(c) for c in curves.values())
    image = Image.new("RGB", (560, 340), "white")
    draw = ImageDraw.Draw(image)
    all_values = [v for c in curves.values() for v in c]
    title = "SER: delta-equivariance (value - no-rho reference) per block, mean over seeds"
    plot = Plot(draw, (60, 30, 540, 300), (1, depth), value_range(all_values), title, "block", "")
    names = sorted(curves)
    for i, name in enumerate(names):
        plot.line(range(1, len(curves[name]) + 1), curves[name], COLOURS[i])
    plot.legend(names)
    image.save(out_png)


def loss_table(pattern, last=10, terms=("std", "cov", "equi", "inv", "pred_std")):
    """A markdown row per SIE run: each loss term's mean over the run's last `last` train lines."""
    print("| run | " + " | ".join(terms) + " |")
    print("|---" * (len(terms) + 1) + "|")
    for path in sorted(glob.glob(os.path.join(pattern, "log.jsonl"))):
        train = [e for e in read_jsonl(path) if e["kind"] == "train"][-last:]
        if not train or not all(t in train[0] for t in terms):
            continue
        means = [mean([e[t] for e in train]) for t in terms]
        name = os.path.basename(os.path.dirname(path))
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="results/study", help="the quick study's result folder")
    p.add_argument("--ser", default="results/ser-toy", help="the SER sweep's result folder")
    p.add_argument("--curves-run", default="sie-toy-s1", help="the SIE run whose curves are drawn")
    p.add_argument("--out", default="assets", help="where the PNG files go")
    p.add_argument("--loss-table", action="store_true",
                   help="also print the SIE runs' loss terms at the end of training")
    args = p.parse_args(argv)
    if args.loss_table:
        loss_table(os.path.join(args.study, "sie-*"))
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.study, args.curves_run, "log.jsonl")
    if os.path.isfile(log):
        sie_curves(log, os.path.join(args.out, "study_sie_curves.png"))
    if glob.glob(os.path.join(args.study, "*", "eval.json")):
        method_bars(os.path.join(args.study, "*"), os.path.join(args.out, "study_methods.png"))
    if glob.glob(os.path.join(args.ser, "*", "eval.json")):
        ser_equivariance(os.path.join(args.ser, "*"),
                         os.path.join(args.out, "study_ser_equivariance.png"))


if __name__ == "__main__":
    main()
