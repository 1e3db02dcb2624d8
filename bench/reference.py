"""The reference for the time-to-accuracy benchmark: transfer learning as a plain PyTorch + torchvision
script does it, without imgtune.

It follows torchvision's transfer-learning tutorial ("ConvNet as fixed feature extractor"): the
pretrained body frozen (``requires_grad=False``), a new linear head, torchvision transforms
(RandomResizedCrop + flip for training; Resize + CenterCrop for validation), a DataLoader that decodes
every image every epoch, the whole network run forward on every step, Adam at 1e-3 on the head. It
takes the same backbone, weights, images and split as the imgtune run it is compared with.

    python bench/reference.py elpv --epochs 3     # on its own; bench/speed.py runs it side by side
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms


class Files(Dataset):
    def __init__(self, items, classes, transform):
        self.items, self.index, self.transform = list(items), {c: i for i, c in enumerate(classes)}, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        with Image.open(item.path) as image:
            return self.transform(image.convert("RGB")), self.index[item.label]


@dataclass
class ReferenceResult:
    epochs: list[dict] = field(default_factory=list)  # epoch, accuracy, seconds (cumulative, from the start)

    @property
    def best(self) -> float:
        return max(e["accuracy"] for e in self.epochs)


def run_reference(data, model: nn.Module, *, size: int, mean, std, epochs: int, bs: int = 32, lr: float = 1e-3,
                  workers: int = 2, seed: int = 0, log=print) -> ReferenceResult:
    """Train ``model``'s head on ``data`` (an imgtune ImageData: only its items and classes are used)."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    normalize = transforms.Normalize(mean, std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    valid_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    train_dl = DataLoader(Files(data.train, data.classes, train_tf), batch_size=bs, shuffle=True, num_workers=workers)
    valid_dl = DataLoader(Files(data.valid, data.classes, valid_tf), batch_size=bs, num_workers=workers)
    for p in model.parameters():
        p.requires_grad = False
    head = model.get_classifier()
    for p in head.parameters():
        p.requires_grad = True
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    result = ReferenceResult()
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y in train_dl:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in valid_dl:
                correct += (model(x).argmax(1) == y).sum().item()
        accuracy = correct / len(data.valid)
        result.epochs.append(dict(epoch=epoch, accuracy=accuracy, seconds=time.perf_counter() - started))
        log(f"  reference epoch {epoch}/{epochs}: accuracy {100 * accuracy:.2f}%  {time.perf_counter() - started:.0f}s")
    return result


if __name__ == "__main__":
    import argparse

    from imgtune import create_model, load_data
    from imgtune.models import get_backbone

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="?", default="elpv")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    images = load_data(args.data)
    backbone = get_backbone("efficientnet_lite0")
    run_reference(images, create_model("efficientnet_lite0", len(images.classes)), size=backbone.size,
                  mean=backbone.mean, std=backbone.std, epochs=args.epochs)
