"""TDLRT against dense, vanilla Tucker factor-SGD, CP and matrix training at equal conv compression.

The same API as ``tucker-manifold compare``: TDLRT runs first for each tolerance; each baseline then
gets ranks whose conv parameter count matches TDLRT's final one, and every method is trained by the same
loop, data order, learning rate and epochs. Writes results.csv, results.md and
accuracy_vs_compression.png to --out and prints the table.

    python examples/compare_methods.py             # 2000 MNIST images, 2 epochs, taus 0.1 and 0.2 (~2 min)
    python examples/compare_methods.py --quick     # sklearn digits, 1 epoch, 3 methods (seconds)
"""
import argparse

import torch

from tucker_manifold.experiments import TrainConfig, compare_methods, markdown_table, summarize


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits, 400 images, 1 epoch, one tau, 3 methods")
    p.add_argument("--out", default="runs/compare_example")
    args = p.parse_args(argv)

    if args.quick:
        base = TrainConfig(model="vgg-mnist", data="digits", subset=400, epochs=1, batch_size=64)
        methods, taus = ["tdlrt", "vanilla-tucker", "dense"], [0.15]
    else:
        base = TrainConfig(model="vgg-mnist", data="mnist", subset=2000, epochs=2)  # lr, batch: the defaults
        methods, taus = ["dense", "tdlrt", "vanilla-tucker", "cp", "matrix"], [0.1, 0.2]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small nets: one thread is faster than two on a shared 2-core CPU
    try:
        rows = compare_methods(base, methods=methods, taus=taus, seeds=1, out=args.out, progress=False)
    finally:
        torch.set_num_threads(threads)
    print(markdown_table(summarize(rows), base))
    best = max((r for r in rows if r["method"] != "dense"), key=lambda r: r["test_acc"])
    print(f"best compressed run: {best['method']} (tau={best['tau']}) with test accuracy {best['test_acc']:.4f} "
          f"at {best['conv_compression']:.1%} conv compression; files in {args.out}/")
    return rows


if __name__ == "__main__":
    main()
