"""Train a base classifier with Gaussian data augmentation at σ (Cohen et al. 2019, §3.3).

Every training image gets fresh N(0, σ²I) noise in [0, 1] pixel space at every step. With
``--noise-copies m --consistency λ --entropy η`` each image gets m noise draws and the loss is
Jeong & Shin's (NeurIPS 2020) consistency regularization: the mean cross-entropy of the m copies
plus λ·(mean KL from the copies' mean prediction to each copy) plus η·(entropy of that mean).
``--init <checkpoint folder>`` starts from a trained checkpoint (fine-tuning; its id and sha256
go into the manifest), and ``--schedule cosine`` decays the rate from ``--lr`` to 0 instead of
the default one-cycle schedule.

With ``--denoiser-for <classifier checkpoint>`` the model trained is a denoiser (``--arch
fmnist_dncnn``) for that frozen classifier (denoised smoothing, Salman et al. 2020), on the same
dataset options: ``--objective mse`` fits the clean image, ``--objective stability`` the
classifier's own label of the clean image through the classifier (cross-entropy). Its checkpoint
has kind "denoiser"; ``python -m models.composed`` puts it in front of the classifier. The state
after each epoch is saved in ``--workdir``; running the same command again resumes from the
last finished epoch. At the end the model is exported as a registry checkpoint (weights +
manifest with the recipe, the command and the per-epoch metrics).

    train --dataset fashion-mnist --arch fmnist_resnet --sigma 0.25 --epochs 30 \\
          --out checkpoints/fmnist-resnet-sigma0.25
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset
from tqdm import tqdm

from models.architectures import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, build_model
from models.checkpoint import load_checkpoint, save_checkpoint
from training.data import class_names, load_dataset

NORMALIZATION = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


@dataclass
class Recipe:
    dataset: str
    arch: str
    sigma: float
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    shift: int = 2  # random translation in pixels (0 = none)
    flip: bool = True  # random horizontal flips
    noise_copies: int = 1  # m: noise draws per image per step (Jeong & Shin 2020); 1 = plain Gaussian augmentation
    consistency: float = 0.0  # λ: weight of the KL between the copies' mean prediction and each copy
    entropy: float = 0.0  # η: weight of the entropy of the copies' mean prediction
    init: str = ""  # checkpoint folder whose weights training starts from ("" = random init)
    schedule: str = "onecycle"  # learning-rate schedule: "onecycle" (peak lr after 15 %) or "cosine" (lr → 0)
    optimizer: str = "sgd"  # "sgd" (Nesterov momentum) or "adam"
    denoiser_for: str = ""  # classifier checkpoint folder: train a denoiser for it ("" = train a classifier)
    objective: str = "mse"  # denoiser: "mse" (to the clean image) or "stability" (classifier's clean label)


def batches(dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator) -> DataLoader:
    """A loader of (images, labels) batches; tensor datasets are indexed a whole batch at a time."""
    if isinstance(dataset, TensorDataset):
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        return DataLoader(dataset, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=2)


def augment(images: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """Random translations (zero fill) and horizontal flips of a batch (B, C, H, W)."""
    b, _, h, w = images.shape
    if recipe.flip:
        flip = torch.rand(b, generator=generator) < 0.5
        images = torch.where(flip.view(b, 1, 1, 1), images.flip(3), images)
    if recipe.shift:
        shifts = torch.randint(-recipe.shift, recipe.shift + 1, (b, 2), generator=generator).float()
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2] = 2 * shifts[:, 0] / w
        theta[:, 1, 2] = 2 * shifts[:, 1] / h
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        images = F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return images


def consistency_loss(logits: torch.Tensor, labels: torch.Tensor, consistency: float, entropy: float) -> torch.Tensor:
    """Jeong & Shin (2020)'s loss for ``logits`` of shape (m, B, C): m noisy copies of B images.

    (1/m)·Σ_i CE(logits_i, y) + λ·(1/m)·Σ_i KL(p̂ ‖ p_i) + η·H(p̂), where p_i = softmax(logits_i)
    and p̂ = (1/m)·Σ_i p_i, averaged over the batch (nats). With m = 1 or λ = η = 0 it is the plain
    cross-entropy of Gaussian augmentation. Gradients flow through p̂ too, as in the authors' code.
    """
    m, b, c = logits.shape
    cross_entropy = F.cross_entropy(logits.reshape(m * b, c), labels.repeat(m))
    if m == 1 or (consistency == 0 and entropy == 0):
        return cross_entropy
    log_p = F.log_softmax(logits, dim=2)  # (m, B, C)
    mean_p = log_p.exp().mean(0)  # p̂, (B, C)
    log_mean_p = mean_p.clamp_min(1e-20).log()
    kl = (mean_p * (log_mean_p - log_p)).sum(2).mean(0)  # (1/m) Σ_i KL(p̂ ‖ p_i), (B,)
    ent = -(mean_p * log_mean_p).sum(1)  # H(p̂), (B,)
    return cross_entropy + (consistency * kl + entropy * ent).mean()


def noisy_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> torch.Tensor:
    """The training loss of one batch: m = ``recipe.noise_copies`` noise draws per image, one forward pass."""
    copies = images.repeat(recipe.noise_copies, 1, 1, 1)  # (m·B, C, H, W), copy i is rows i·B … (i+1)·B − 1
    noisy = copies + recipe.sigma * torch.randn(copies.shape, generator=generator)
    logits = model(noisy).view(recipe.noise_copies, len(labels), -1)
    return consistency_loss(logits, labels, recipe.consistency, recipe.entropy)


def initial_weights(model: nn.Module, recipe: Recipe, classes: list[str]) -> dict[str, str]:
    """Load ``recipe.init``'s weights into ``model`` (same architecture and classes); return what was loaded."""
    init_model, init_manifest = load_checkpoint(Path(recipe.init))
    if init_manifest.architecture != recipe.arch or init_manifest.classes != classes:
        sys.exit(
            f"--init {recipe.init}: a {init_manifest.architecture} over {init_manifest.num_classes} classes, "
            f"not a {recipe.arch} over this dataset's {len(classes)}"
        )
    model.load_state_dict(init_model.state_dict())
    return {"path": recipe.init, "id": init_manifest.id, "sha256": init_manifest.sha256}


def frozen_classifier(recipe: Recipe, classes: list[str]) -> tuple[nn.Module, dict[str, str]]:
    """The classifier of ``recipe.denoiser_for`` in eval mode without gradients for its weights."""
    classifier, manifest = load_checkpoint(Path(recipe.denoiser_for))
    if manifest.kind != "classifier" or manifest.classes != classes:
        sys.exit(f"--denoiser-for {recipe.denoiser_for}: not a classifier over this dataset's {len(classes)} classes")
    classifier.requires_grad_(False)
    return classifier.eval(), {"path": recipe.denoiser_for, "id": manifest.id, "sha256": manifest.sha256}


def denoiser_loss(
    denoiser: nn.Module, classifier: nn.Module, images: torch.Tensor, recipe: Recipe, generator: torch.Generator
) -> torch.Tensor:
    """MSE (per pixel, [0, 1] units²) of the denoised noisy images to the clean ones, or the stability loss:
    cross-entropy of classifier(denoiser(x + δ)) against the classifier's label of x (Salman et al. 2020)."""
    denoised = denoiser(images + recipe.sigma * torch.randn(images.shape, generator=generator))
    if recipe.objective == "mse":
        return F.mse_loss(denoised, images)
    with torch.no_grad():
        target = classifier(images).argmax(1)
    return F.cross_entropy(classifier(denoised), target)


@torch.inference_mode()
def denoising_error(denoiser: nn.Module, dataset: Dataset, sigma: float, seed: int) -> dict[str, float]:
    """Mean squared error per pixel of the denoised test images (one noise draw each), and of the noisy ones."""
    denoiser.eval()
    generator = torch.Generator().manual_seed(seed)
    denoised_sum = noisy_sum = pixels = 0.0
    for images, _ in batches(dataset, 500, shuffle=False, generator=generator):
        noise = sigma * torch.randn(images.shape, generator=generator)
        denoised_sum += F.mse_loss(denoiser(images + noise), images, reduction="sum").item()
        noisy_sum += noise.square().sum().item()
        pixels += images.numel()
    return {"denoised_mse": denoised_sum / pixels, "noisy_mse": noisy_sum / pixels}


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: Dataset, sigma: float, seed: int) -> dict[str, float]:
    """Clean accuracy and accuracy under one draw of N(0, σ²I) per test image, in [0, 1]."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    correct_clean = correct_noisy = total = 0
    for images, labels in batches(dataset, 500, shuffle=False, generator=generator):
        correct_clean += (model(images).argmax(1) == labels).sum().item()
        noisy = images + sigma * torch.randn(images.shape, generator=generator)
        correct_noisy += (model(noisy).argmax(1) == labels).sum().item()
        total += len(labels)
    return {"clean_accuracy": correct_clean / total, "noisy_accuracy": correct_noisy / total}


def train(recipe: Recipe, workdir: Path, out: Path, model_id: str, data_root: Path | None, command: str) -> None:
    torch.manual_seed(recipe.seed)
    train_set = load_dataset(recipe.dataset, "train", data_root)
    test_set = load_dataset(recipe.dataset, "test" if recipe.dataset != "imagenet" else "val", data_root)
    classes = class_names(recipe.dataset, train_set)
    mean, std = NORMALIZATION[recipe.dataset]
    classifier, classifier_info = frozen_classifier(recipe, classes) if recipe.denoiser_for else (None, None)
    if classifier is not None:  # a denoiser works in pixel space: identity normalization
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    model = build_model(recipe.arch, len(classes), mean, std)
    input_shape = tuple(next(iter(batches(test_set, 1, False, torch.Generator())))[0].shape[1:])
    if classifier is not None:
        with torch.no_grad():
            shape = tuple(model.eval()(torch.zeros(1, *input_shape)).shape[1:])
        if shape != input_shape:
            sys.exit(f"--arch {recipe.arch} maps {input_shape} images to {shape}: not a denoiser")
    init = initial_weights(model, recipe, classes) if recipe.init else None
    if recipe.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay
        )
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=True
        )
    steps_per_epoch = -(-len(train_set) // recipe.batch_size)
    total_steps = recipe.epochs * steps_per_epoch
    if recipe.schedule == "cosine":
        scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps
        )
    else:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, total_steps=total_steps, pct_start=0.15
        )
    generator = torch.Generator().manual_seed(recipe.seed)
    log: list[dict[str, float]] = []
    state_path = workdir / "last.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["recipe"] != asdict(recipe):
            sys.exit(f"{state_path} was made with another recipe {state['recipe']}; use another --workdir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        log = state["log"]
        print(f"resuming {model_id} after epoch {len(log)} from {state_path}", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)

    for epoch in range(len(log) + 1, recipe.epochs + 1):
        model.train()
        started = time.time()
        loss_sum = seen = 0.0
        progress = tqdm(
            batches(train_set, recipe.batch_size, True, generator),
            total=steps_per_epoch,
            desc=f"{model_id} epoch {epoch}/{recipe.epochs}",
            leave=False,
            mininterval=2,
        )
        for images, labels in progress:
            images = augment(images, recipe, generator)
            if classifier is None:
                loss = noisy_loss(model, images, labels, recipe, generator)
            else:
                loss = denoiser_loss(model, classifier, images, recipe, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(labels)
            seen += len(labels)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}", refresh=False)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            **evaluate(
                model if classifier is None else nn.Sequential(model, classifier), test_set, recipe.sigma, epoch
            ),
            **({} if classifier is None else denoising_error(model, test_set, recipe.sigma, seed=epoch)),
            "seconds": time.time() - started,
        }
        log.append(metrics)
        print(json.dumps(metrics), flush=True)
        torch.save(
            {
                "recipe": asdict(recipe),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "log": log,
            },
            state_path,
        )

    manifest = save_checkpoint(
        model.eval(),
        out,
        id=model_id,
        kind="classifier" if classifier is None else "denoiser",
        architecture=recipe.arch,
        dataset=recipe.dataset,
        classes=classes,
        input_shape=input_shape,
        sigma=recipe.sigma,
        normalization={"mean": list(mean), "std": list(std)},
        training={
            "recipe": asdict(recipe),
            "command": command,
            **({"init": init} if init else {}),
            **({"classifier": classifier_info} if classifier_info else {}),
            "final": log[-1],
            "epochs": log,
        },
        source={"trained_by": "training.train"},
    )
    print(f"wrote {out} (sha256 {manifest.sha256[:12]}…)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(NORMALIZATION), required=True)
    parser.add_argument(
        "--data-root", type=Path, help="local dataset folder (CIFAR-10, ImageNet; Fashion-MNIST has a default)"
    )
    parser.add_argument("--arch", required=True)
    parser.add_argument(
        "--sigma",
        type=float,
        required=True,
        help="noise level σ in [0, 1] pixel units (0: no noise, a classifier for a denoiser to serve)",
    )
    defaults = Recipe(dataset="", arch="", sigma=0.0)
    for field in ("epochs", "batch_size", "seed", "shift", "lr", "momentum", "weight_decay"):
        default = getattr(defaults, field)
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--noise-copies", type=int, default=1, help="m noise draws per image per step (default 1)")
    parser.add_argument("--consistency", type=float, default=0.0, help="λ of Jeong & Shin's consistency KL term")
    parser.add_argument("--entropy", type=float, default=0.0, help="η of Jeong & Shin's entropy term")
    parser.add_argument("--init", type=Path, help="checkpoint folder to start from (fine-tuning)")
    parser.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle", help="learning-rate schedule")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="sgd: Nesterov momentum")
    parser.add_argument("--denoiser-for", type=Path, help="classifier checkpoint folder: train a denoiser for it")
    parser.add_argument("--objective", choices=("mse", "stability"), default="mse", help="denoiser training objective")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--id", help="model id (default: the --out folder's name)")
    parser.add_argument("--workdir", type=Path, help="where per-epoch state is kept (default: runs/<id>)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe(
        dataset=args.dataset,
        arch=args.arch,
        sigma=args.sigma,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        shift=args.shift,
        flip=not args.no_flip,
        noise_copies=args.noise_copies,
        consistency=args.consistency,
        entropy=args.entropy,
        init=str(args.init) if args.init else "",
        schedule=args.schedule,
        optimizer=args.optimizer,
        denoiser_for=str(args.denoiser_for) if args.denoiser_for else "",
        objective=args.objective,
    )
    if recipe.noise_copies < 1:
        parser.error("--noise-copies must be at least 1")
    command = "train " + shlex.join(sys.argv[1:] if argv is None else argv)
    model_id = args.id or args.out.name
    train(recipe, args.workdir or Path("runs") / model_id, args.out, model_id, args.data_root, command)


if __name__ == "__main__":
    main()
