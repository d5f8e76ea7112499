"""Train a small VGG on MNIST with Tucker-format convolutions and the rank-adaptive TDLRT integrator.

The lines inside ``main`` are all it takes: load data, build a model, ``tuckerize`` it, build ``TDLRT``,
and step with a closure (TDLRT evaluates the gradient twice per step). The channel ranks start at half
the channels and shrink to what the tolerance ``tau`` needs.

    python examples/train_mnist.py             # 3000 MNIST images, 2 epochs: ~96% test accuracy at
                                               # ~82% conv compression, about 30 s on one CPU core
    python examples/train_mnist.py --quick     # sklearn digits, 400 images, 1 epoch (a few seconds)
"""
import argparse

import torch
import torch.nn.functional as F

from tucker_manifold.data import load_dataset, make_loaders
from tucker_manifold.models import build_model
from tucker_manifold.nn import compression_rate, ranks, tuckerize
from tucker_manifold.optim import TDLRT
from tucker_manifold.experiments import evaluate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", help="mnist (needs the [data] extra) or digits")
    p.add_argument("--subset", type=int, default=3000, help="training images")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--tau", type=float, default=0.1, help="relative truncation tolerance")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--quick", action="store_true", help="digits, 400 images, 1 epoch")
    p.add_argument("--out", default=None, help="unused (accepted like the other examples)")
    args = p.parse_args(argv)
    if args.quick:
        args.data, args.subset, args.epochs = "digits", 400, 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small net: on a shared 2-core CPU one thread measured several times faster
    try:
        torch.manual_seed(0)
        data = load_dataset(args.data, subset=args.subset)
        train_loader, test_loader = make_loaders(data, batch_size=32, seed=0)
        model = build_model("vgg-mnist", data.in_channels, data.num_classes, data.image_size)
        model = tuckerize(model, rank_fraction=0.5)  # every conv -> TuckerConv2d at half the channels
        opt = TDLRT(model.parameters(), lr=args.lr, tau=args.tau, momentum=0.9)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)  # TDLRT is an Optimizer

        for epoch in range(1, args.epochs + 1):
            model.train()
            for x, y in train_loader:
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    loss.backward()
                    return loss

                loss = opt.step(closure)  # calls closure twice: augment bases, then step the core
            schedule.step()
            test_loss, test_acc = evaluate(model, test_loader)
            cr = compression_rate(model)
            print(f"epoch {epoch}: last batch loss {loss.item():.3f}, test accuracy {test_acc:.4f}, conv "
                  f"compression {cr['conv']:.1%} ({cr['conv_params']} of {cr['conv_dense_params']} parameters)")
            print("  ranks (out, in):", {name: r[:2] for name, r in ranks(model).items()})
        return {"test_acc": test_acc, "conv_compression": cr["conv"], "ranks": ranks(model)}
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
