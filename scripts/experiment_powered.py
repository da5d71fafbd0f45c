#!/usr/bin/env python3
"""Tables of scripts/experiment_powered.sh (docs/experiments.md).

  experiment_powered.py OUT --pick-level 1 2 3 4 5 6    prints the level to run
  experiment_powered.py OUT --level L --first-seed 1 --seeds 1 2 3   the Markdown tables
  experiment_powered.py OUT --level L --first-seed 1 --compare A B   two evaluations of one run, row by row

The first seed's 2d-dpo run trains inside the iterate round (run_dir).

Intervals: 95% bootstrap (2000 resamples, seeded). Over seeds, the
resample draws seeds and problems; a paired difference is taken per
problem and seed, then resampled the same way.
"""
import hashlib
import json
import os
import random
import re
import sys

MEASURES = [
    ("final answers right, %", "right"),
    ("stated calculations wrong, %", "wrong_calc"),
    ("answer score 0-4", "score"),
]
LOW, HIGH = 0.025, 0.975
RESAMPLES = 2000


def results(out, name):
    path = f"{out}/eval/{name}/results.json"
    return json.load(open(path)) if os.path.exists(path) else None


def per_problem(res):
    """id -> (right 0/100, calculations, wrong calculations, answer score)."""
    return {
        r["id"]: (100.0 if r.get("correct") else 0.0, r.get("calculations", 0), r.get("wrong_calculations", 0), r["checked_score"])
        for r in res["records"]
    }


def measure(rows, key):
    """One number from a list of per-problem tuples (a ratio of sums for wrong calculations)."""
    if key == "right":
        return sum(r[0] for r in rows) / len(rows)
    if key == "score":
        return sum(r[3] for r in rows) / len(rows)
    stated = sum(r[1] for r in rows)
    return 100.0 * sum(r[2] for r in rows) / stated if stated else float("nan")


def bootstrap(by_seed, key, seed=7):
    """Mean over seeds and problems, with a 95% interval drawing seeds and problems."""
    rng = random.Random(seed)
    seeds = list(by_seed)
    ids = sorted(set.intersection(*(set(by_seed[s]) for s in seeds)))
    point = measure([by_seed[s][i] for s in seeds for i in ids], key)
    stats = []
    for _ in range(RESAMPLES):
        ss = [rng.choice(seeds) for _ in seeds]
        ii = [rng.choice(ids) for _ in ids]
        stats.append(measure([by_seed[s][i] for s in ss for i in ii], key))
    stats.sort()
    return point, stats[int(LOW * RESAMPLES)], stats[int(HIGH * RESAMPLES) - 1]


def paired(a, b, key, seed=11):
    """a - b, paired by problem and seed (wrong calculations: the difference of the two ratios)."""
    rng = random.Random(seed)
    seeds = sorted(set(a) & set(b))
    ids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))

    def diff(ss, ii):
        return measure([a[s][i] for s in ss for i in ii], key) - measure([b[s][i] for s in ss for i in ii], key)

    stats = sorted(diff([rng.choice(seeds) for _ in seeds], [rng.choice(ids) for _ in ids]) for _ in range(RESAMPLES))
    return diff(seeds, ids), stats[int(LOW * RESAMPLES)], stats[int(HIGH * RESAMPLES) - 1]


def fmt(e, digits=1):
    p, lo, hi = e
    return f"{p:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


def pick_level(out, levels):
    acc = {l: results(out, f"base-level-{l}")["summary"]["headline"]["mean"] for l in levels}
    inside = [l for l in levels if 25.0 <= acc[l] <= 60.0]
    if not inside:
        sys.exit(f"no level has a base accuracy within 25-60%: {acc}")
    print(min(inside, key=lambda l: abs(acc[l] - 40.0)))


def level_table(out, levels):
    print("| level | problems | base model's final answers right, % (95% CI) | answer score 0-4 | stated calculations wrong, % | mean answer chars |")
    print("|---|---|---|---|---|---|")
    for l in levels:
        res = results(out, f"base-level-{l}")
        if res is None:
            continue
        s = res["summary"]
        h, c = s["headline"], s["checked_score"]
        wrong = s.get("wrong_calculation_share")
        what = re.search(r"\((level [^)]*?), seed", res["source"]).group(1)
        print(
            f"| {what} | {h['n']} | {h['mean']:.1f} ({h['low']:.1f}-{h['high']:.1f}) | {c['mean']:.2f} | "
            f"{'-' if wrong is None else f'{100 * wrong:.1f}'} | {s['mean_answer_chars']:.0f} |"
        )


def pair_table(out, level):
    root = f"{out}/level-{level}/pairs/round-1"
    scored = [json.loads(l) for l in open(f"{root}/scored.jsonl")]
    pairs = [json.loads(l) for l in open(f"{root}/pairs.jsonl")]
    round_ = json.load(open(f"{root}/round.json"))
    by_prompt = {json.dumps(s["prompt"]): s for s in scored}
    chosen_right = hidden = rejected_right = 0
    any_right = sum(1 for s in scored if any(s.get("right", [])))
    for p in pairs:
        s = by_prompt[json.dumps(p["prompt"])]
        i = s["responses"].index(p["chosen"])
        j = s["responses"].index(p["rejected"])
        right = s["right"][i]
        chosen_right += right
        rejected_right += s["right"][j]
        # A wrong step the final answer hides: a segment the checker marks incorrect in an answer whose final answer is right.
        if right and any(seg["scores"]["correctness"] == 0 for seg in p["chosen"]["segments"]):
            hidden += 1
    seg = lambda side: [x["scores"]["correctness"] for p in pairs for x in p[side]["segments"]]
    chosen_wrong_segs = sum(c == 0 for c in seg("chosen"))
    rejected_right_segs = sum(c == 4 for c in seg("rejected"))
    samples = sum(len(s["right"]) for s in scored)
    right_samples = sum(sum(s["right"]) for s in scored)
    n = len(pairs)
    print("| prompts | samples | samples right | prompts with a right sample | pairs | chosen right | rejected right | chosen right but holding a wrong step |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {len(scored)} | {samples} | {right_samples} ({100 * right_samples / samples:.1f}%) | {any_right} | {n} | "
        f"{chosen_right} ({100 * chosen_right / n:.1f}%) | {rejected_right} | {hidden} ({100 * hidden / n:.1f}%) |"
    )
    print()
    print(
        f"Segments: chosen {len(seg('chosen'))}, of which {chosen_wrong_segs} scored incorrect; "
        f"rejected {len(seg('rejected'))}, of which {rejected_right_segs} scored correct."
    )
    print()
    print(f"Mean answer score of all samples {round_['mean_score']:.3f}; chosen {round_['chosen_mean_score']:.3f}; rejected {round_['rejected_mean_score']:.3f}.")


def last_metrics(path, keys):
    """The last logged value of each key in a metrics.jsonl."""
    last = {}
    for line in open(path):
        last.update({k: v for k, v in json.loads(line).items() if k in keys and v is not None})
    return [last.get(k, float("nan")) for k in keys]


def run_dir(out, level, run, first_seed):
    """A run's output directory, by its id NAME-seed-S (the same rule as run_dir in the shell script)."""
    if run == f"2d-dpo-seed-{first_seed}":
        return f"{out}/level-{level}/pairs/round-1/train"
    return f"{out}/level-{level}/{run}"


def models(out, level, seeds):
    names = [("dpo", "dpo"), ("1d-dpo", "1d-dpo"), ("2d-dpo", "2d-dpo"), ("2d-dpo-correctness", "2d-dpo, correctness-heavy weights")]
    data = {"base": {0: per_problem(results(out, "base"))}}
    for n, _ in names:
        got = {s: results(out, f"{n}-seed-{s}") for s in seeds}
        got = {s: per_problem(r) for s, r in got.items() if r is not None}
        if got:
            data[n] = got
    return names, data


def tables(out, level, first_seed, seeds):
    levels = sorted({int(d.split("-")[-1]) for d in os.listdir(f"{out}/eval") if d.startswith("base-level-")})
    print(f"### Base model per level\n")
    level_table(out, levels)
    print(f"\n### Pairs (level {level})\n")
    pair_table(out, level)
    names, data = models(out, level, seeds)
    print(f"\n### Models on the held-out problems of level {level} (mean over seeds, 95% CI)\n")
    print("| model | seeds | " + " | ".join(m for m, _ in MEASURES) + " |")
    print("|---|---|" + "---|" * len(MEASURES))
    for n, label in [("base", "base model")] + names:
        if n not in data:
            continue
        cells = [fmt(bootstrap(data[n], k), 2 if k == "score" else 1) for _, k in MEASURES]
        print(f"| {label} | {len(data[n]) if n != 'base' else '-'} | " + " | ".join(cells) + " |")
    print("\n### Per seed\n")
    print("| model | seed | " + " | ".join(m for m, _ in MEASURES) + " | final train loss | rewards/accuracies | rewards/margins |")
    print("|---|---|" + "---|" * (len(MEASURES) + 3))
    for n, label in names:
        for s in sorted(data.get(n, {})):
            rows = list(data[n][s].values())
            m = f"{run_dir(out, level, f'{n}-seed-{s}', first_seed)}/metrics.jsonl"
            loss, acc, margin = last_metrics(m, ("loss", "rewards/accuracies", "rewards/margins"))
            cells = [f"{measure(rows, k):.{2 if k == 'score' else 1}f}" for _, k in MEASURES]
            print(f"| {label} | {s} | " + " | ".join(cells) + f" | {loss:.4f} | {acc:.2f} | {margin:.3f} |")
    print("\n### Paired differences (by problem and seed, 95% CI)\n")
    print("| difference | " + " | ".join(m for m, _ in MEASURES) + " |")
    print("|---|" + "---|" * len(MEASURES))
    for a, b in [("2d-dpo", "dpo"), ("2d-dpo", "1d-dpo"), ("1d-dpo", "dpo"), ("2d-dpo-correctness", "2d-dpo"), ("2d-dpo-correctness", "dpo")]:
        if a in data and b in data:
            cells = [fmt(paired(data[a], data[b], k), 2 if k == "score" else 1) for _, k in MEASURES]
            print(f"| {a} - {b} | " + " | ".join(cells) + " |")
    if os.path.exists(f"{out}/timings.tsv"):
        total = sum(int(l.split("\t")[1]) for l in open(f"{out}/timings.tsv") if "\t" in l and not l.startswith("rerun"))
        print(f"\nStages' wall time in all (reruns aside): {total} s ({total / 60:.0f} min); per stage in {out}/timings.tsv.")


def weights_digest(d):
    h = hashlib.sha256()
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            h.update(open(os.path.join(d, f), "rb").read())
    return h.hexdigest()[:16]


def compare(out, level, first_seed, a, b):
    da, db = (f"{run_dir(out, level, x, first_seed)}/final" for x in (a, b))
    if os.path.isdir(da) and os.path.isdir(db):
        print(f"trained weights (sha256 of the adapter files): {a} {weights_digest(da)}, {b} {weights_digest(db)}")
    ra, rb = per_problem(results(out, a)), per_problem(results(out, b))
    same = sum(ra[i] == rb.get(i) for i in ra)
    print(f"{a}: " + ", ".join(f"{m} {measure(list(ra.values()), k):.2f}" for m, k in MEASURES))
    print(f"{b}: " + ", ".join(f"{m} {measure(list(rb.values()), k):.2f}" for m, k in MEASURES))
    print(f"{same} of {len(ra)} problems scored the same")


def main():
    out, args = sys.argv[1], sys.argv[2:]
    if args[0] == "--pick-level":
        return pick_level(out, [int(x) for x in args[1:]])
    level, first_seed = int(args[1]), int(args[3])
    if args[4] == "--compare":
        return compare(out, level, first_seed, args[5], args[6])
    tables(out, level, first_seed, [int(x) for x in args[5:]])


if __name__ == "__main__":
    main()
