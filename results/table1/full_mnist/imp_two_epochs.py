"""IMP on the full-MNIST Table 1 setting, matched to the 1-epoch TDLRT runs' per-layer conv counts, with 2 epochs.

IMP needs at least 2 epochs (one train / prune / rewind round and the final training), so the 1-epoch
``compare`` cannot run it. Here it gets twice the others' training budget, which favours it.

    python results/table1/full_mnist/imp_two_epochs.py --ref runs/table1_full/runs --out runs/table1_full_imp

For every seed s, reads ``REF/tdlrt_tau0.12_seed<s>/metrics.json`` (the reference run of ``compare``), sets
IMP's conv sparsity with the same matcher as ``compare`` (``match_sparsity``), and trains
``vgg-mnist`` on full MNIST, batch 128, 2 epochs, one thread. Writes each run under OUT/imp_tau0.12_seed<s>
and a summary to OUT/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from tucker_manifold.experiments import TrainConfig
from tucker_manifold.experiments.methods import match_sparsity
from tucker_manifold.experiments.runner import build_dense, load_data, run_experiment


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="runs/table1_full/runs", help="folder of the compare's run folders")
    ap.add_argument("--out", default="runs/table1_full_imp")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref, out = Path(a.ref), Path(a.out)
    refs = [json.loads((ref / f"tdlrt_tau0.12_seed{s}" / "metrics.json").read_text()) for s in range(a.seeds)]
    bundle = load_data(TrainConfig.from_dict(refs[0]["config"]))  # the seeds differ only in seed: one data set
    rows = []
    for s, m in enumerate(refs):
        base = TrainConfig.from_dict(m["config"])
        overrides, how = match_sparsity(build_dense(base, bundle), m["layer_conv_params"], "imp")
        cfg = dataclasses.replace(base, method="imp", tau=0.12, epochs=a.epochs, **overrides)
        r = run_experiment(cfg, out / f"imp_tau0.12_seed{s}", progress=False, bundle=bundle).metrics
        rows.append(dict(seed=s, test_acc=r["test_acc"], conv_compression=r["conv_compression"],
                         tdlrt_conv_compression=m["conv_compression"], match=how, time_per_epoch_s=r["time_per_epoch_s"]))
        print(rows[-1], flush=True)
    accs = [100 * r["test_acc"] for r in rows]
    comp = [100 * r["conv_compression"] for r in rows]
    lines = ["| method | seeds | epochs | test accuracy (%) | per seed | conv compression (%) | matched to |",
             "|---|---|---|---|---|---|---|",
             f"| imp | {len(rows)} | {a.epochs} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0.0:.2f} "
             f"| {' / '.join(f'{x:.2f}' for x in accs)} | {statistics.mean(comp):.1f} | tdlrt tau 0.12, 1 epoch, per seed |"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
