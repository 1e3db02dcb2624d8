"""What the model gets wrong and where it looks: confusion matrix, most confused pairs, top losses, Grad-CAM.

An :class:`Interpretation` holds the predictions over a validation set (probabilities, targets and
per-item losses, never the images) and the model, so that Grad-CAM (:mod:`imgtune.explain.gradcam`)
can be computed for any image. Build one from a :class:`~imgtune.train.learner.Learner` or from a run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from imgtune.data.images import load_image, to_rgb
from imgtune.data.loaders import ImageData, load_data
from imgtune.data.transforms import valid_transform
from imgtune.errors import ImgtuneError
from imgtune.explain import gradcam
from imgtune.html_repr import table
from imgtune.models import gradcam_layer

#: The smallest probability a loss is computed from, so a confident mistake costs ~69, not infinity.
MIN_PROB = 1e-30


@dataclass
class TopLoss:
    """One validation image the model got most wrong (or least sure right)."""

    index: int  # position in the validation set
    path: Path | None  # the image file (None if unknown)
    actual: str
    predicted: str
    probability: float  # the model's probability of `predicted`
    actual_probability: float
    loss: float


class ConfusedPairs(list):
    """``(actual, predicted, count)`` tuples, most frequent first: a plain list (index it, slice it,
    compare it with a list), which a notebook shows as a table (``_repr_html_``)."""

    def _repr_html_(self) -> str:
        return table(["actual", "predicted", "count"], self, caption="most confused")


class Interpretation:
    """Predictions over a validation set, and the model that made them.

    Attributes:
        classes: class names; the columns of ``probs`` follow them.
        probs: ``(N, C)`` float32 probabilities.
        targets: ``(N,)`` int64 class indices of the true labels.
        losses: ``(N,)`` float32 cross-entropy of each item.
        paths: the N image files in order, or an empty list when unknown.
        model: the model (for :meth:`grad_cam`); Grad-CAM runs it in eval mode and restores its modes.
        transform: the deterministic transform, PIL image -> normalised ``(3, size, size)`` tensor.
        arch: the registry or timm name, which picks the Grad-CAM layer.
        meta: ``size``, ``resize``, ``mean``, ``std`` of the model's input.
    """

    def __init__(
        self,
        classes: Sequence[str],
        probs: np.ndarray,
        targets: np.ndarray,
        losses: np.ndarray | None = None,
        *,
        paths: Sequence[str | Path] = (),
        model: torch.nn.Module | None = None,
        transform=None,
        arch: str = "",
        meta: dict | None = None,
    ):
        """Store the predictions; ``losses=None`` computes each item's cross-entropy from ``probs``."""
        self.classes = list(classes)
        self.probs = np.asarray(probs, dtype=np.float32)
        self.targets = np.asarray(targets, dtype=np.int64)
        if losses is None:
            picked = self.probs[np.arange(len(self.targets)), self.targets]
            losses = -np.log(np.maximum(picked.astype(np.float64), MIN_PROB))
        self.losses = np.asarray(losses, dtype=np.float32)
        self.paths = [Path(p) for p in paths]
        self.model = model
        self.transform = transform
        self.arch = arch
        self.meta = dict(meta or {})
        n = len(self.targets)
        if self.probs.shape != (n, len(self.classes)) or self.losses.shape != (n,):
            raise ValueError(f"probs {self.probs.shape}, targets ({n},) and losses {self.losses.shape} do not fit "
                             f"{len(self.classes)} classes")
        if self.paths and len(self.paths) != n:
            raise ValueError(f"{len(self.paths)} paths for {n} predictions")

    # --- building ---------------------------------------------------------------------------------

    @classmethod
    def from_learner(cls, learner, dl=None) -> "Interpretation":
        """Predict over ``dl`` (the learner's validation loader by default), one batch at a time.

        The image files come from ``dl.dataset.items`` when the dataset has them.

        Args:
            learner: a trained :class:`imgtune.Learner`.
            dl: a loader of ``(images, targets)`` (default: the validation set).

        Returns:
            An :class:`Interpretation` with the learner's model, for Grad-CAM.
        """
        # Without a dl, get_preds reads the validation set's cached features while the body is frozen.
        probs, targets, losses = learner.get_preds(dl)  # keeps (N, C) probabilities, never the images
        dl = dl if dl is not None else learner.valid_dl
        items = getattr(getattr(dl, "dataset", None), "items", None) or []
        paths = [Path(getattr(item, "path", item)) for item in items]
        config = learner.config
        meta = {k: config[k] for k in ("size", "resize", "mean", "std") if k in config}
        transform = None
        if {"size", "mean", "std"} <= meta.keys():
            meta.setdefault("resize", "crop")
            transform = valid_transform(meta["size"], meta["resize"], meta["mean"], meta["std"])
        return cls(learner.classes, probs.numpy(), targets.numpy(), losses.numpy(), paths=paths,
                   model=learner.model, transform=transform, arch=config.get("arch") or config.get("timm_name", ""),
                   meta=meta)

    @classmethod
    def from_run(cls, run_dir: str | Path, data: ImageData | None = None, *, bs: int = 32,
                 device: str | torch.device = "cpu") -> "Interpretation":
        """Load a run's model bundle and predict over a validation set, ``bs`` images at a time.

        Args:
            run_dir: a folder written by ``imgtune train`` (or ``Learner.save``).
            data: the images whose ``valid`` items are interpreted; ``None`` rebuilds the run's own
                validation set from its ``split.csv``.
            bs: images per batch.
            device: where the model runs.

        Raises:
            ImgtuneError: not a bundle, no ``split.csv``, or the data has classes the model lacks.
        """
        from imgtune.deploy.predict import Predictor

        run_dir = Path(run_dir)
        predictor = Predictor.load(run_dir, device=device)
        if data is None:
            split_csv = run_dir / "split.csv"
            if not split_csv.is_file():
                raise ImgtuneError(f"{run_dir}: has no split.csv to rebuild the validation set from; "
                                   "pass the data to interpret")
            data = load_data(csv_path=split_csv, check=False)
        unknown = [c for c in data.classes if c not in predictor.classes]
        if unknown:
            raise ImgtuneError(f"the data has classes the model was not trained on: {', '.join(unknown[:5])}"
                               f" (the model knows {', '.join(predictor.classes[:10])})")
        index = {c: i for i, c in enumerate(predictor.classes)}
        paths = [item.path for item in data.valid]
        targets = np.array([index[item.label] for item in data.valid], dtype=np.int64)
        chunks = []
        for start in range(0, len(paths), bs):
            logits = predictor.logits(paths[start:start + bs])  # (bs, C); the images are dropped at once
            chunks.append(logits.log_softmax(1))
        log_probs = torch.cat(chunks) if chunks else torch.zeros(0, len(predictor.classes))
        losses = F.nll_loss(log_probs, torch.from_numpy(targets), reduction="none")
        return cls(predictor.classes, log_probs.exp().numpy(), targets, losses.numpy(), paths=paths,
                   **_model_of(predictor))

    @classmethod
    def for_model(cls, predictor) -> "Interpretation":
        """No predictions, only a loaded bundle's model: for :meth:`grad_cam` and :meth:`overlay` on new images.

        Args:
            predictor: a PyTorch :class:`imgtune.Predictor`.

        Returns:
            An :class:`Interpretation` with no validation items.
        """
        no_items = np.zeros((0, len(predictor.classes)), dtype=np.float32)
        return cls(predictor.classes, no_items, np.zeros(0, dtype=np.int64), **_model_of(predictor))

    # --- what went wrong --------------------------------------------------------------------------

    @property
    def preds(self) -> np.ndarray:
        """``(N,)`` predicted class indices (the most probable; the first on a tie)."""
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        """The fraction predicted right (NaN for no items)."""
        return float(np.mean(self.preds == self.targets)) if len(self.targets) else float("nan")

    def confusion_matrix(self) -> np.ndarray:
        """``(C, C)`` counts: row = actual class, column = predicted class."""
        matrix = np.zeros((len(self.classes), len(self.classes)), dtype=np.int64)
        np.add.at(matrix, (self.targets, self.preds), 1)
        return matrix

    def most_confused(self, min_count: int = 1) -> ConfusedPairs:
        """``(actual, predicted, count)`` for each mistake made at least ``min_count`` times,
        most frequent first, then by the names.

        Args:
            min_count: leave out pairs confused fewer times.

        Returns:
            A :class:`ConfusedPairs`: a list, which a notebook shows as a table.
        """
        matrix = self.confusion_matrix()
        pairs = [(self.classes[a], self.classes[p], int(matrix[a, p]))
                 for a in range(len(self.classes)) for p in range(len(self.classes))
                 if a != p and matrix[a, p] >= max(1, min_count)]
        return ConfusedPairs(sorted(pairs, key=lambda pair: (-pair[2], pair[0], pair[1])))

    def top_losses(self, k: int = 9) -> list[TopLoss]:
        """The ``k`` items with the highest loss, highest first (ties in validation-set order).

        Args:
            k: how many.

        Returns:
            A :class:`TopLoss` per item.
        """
        order = np.argsort(-self.losses, kind="stable")[:k]
        preds = self.preds
        return [
            TopLoss(index=int(i), path=self.paths[i] if self.paths else None,
                    actual=self.classes[self.targets[i]], predicted=self.classes[preds[i]],
                    probability=float(self.probs[i, preds[i]]),
                    actual_probability=float(self.probs[i, self.targets[i]]), loss=float(self.losses[i]))
            for i in order
        ]

    def classification_report(self) -> list[dict]:
        """Precision, recall, F1 and support of each class, then a ``"macro avg"`` row.

        A class never predicted has precision 0.0; one with no items has recall 0.0. The macro
        average is over the classes that occur as actual or predicted (as scikit-learn's report
        does by default), so the classes of a model that a smaller data set lacks do not drag it down;
        its support is the number of items.
        """
        matrix = self.confusion_matrix()
        rows, present = [], []
        for c, name in enumerate(self.classes):
            hits, predicted, support = int(matrix[c, c]), int(matrix[:, c].sum()), int(matrix[c, :].sum())
            precision = hits / predicted if predicted else 0.0
            recall = hits / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
            if predicted or support:
                present.append(rows[-1])
        macro = {key: float(np.mean([row[key] for row in present])) if present else 0.0
                 for key in ("precision", "recall", "f1")}
        rows.append({"class": "macro avg", **macro, "support": len(self.targets)})
        return rows

    # --- figures (a notebook shows a returned Figure; ``fig.savefig(path)`` writes one) ---------------

    def plot_confusion_matrix(self, normalize: bool = False):
        """The confusion matrix as a matplotlib Figure (the report's ``confusion_matrix.png``).

        Args:
            normalize: each row as fractions of its actual class instead of counts.
        """
        from imgtune.explain.figures import plot_confusion_matrix

        return plot_confusion_matrix(self.confusion_matrix(), self.classes, normalize=normalize)

    def plot_top_losses(self, k: int = 9, *, cam: bool = True):
        """The ``k`` worst validation images as a Figure, titled actual / predicted, loss and probability,
        each with its Grad-CAM overlay when ``cam`` and the model has a Grad-CAM layer (the report's
        ``top_losses.png``).

        Args:
            k: how many images.
            cam: overlay each picture's Grad-CAM heatmap.

        Returns:
            A :class:`matplotlib.figure.Figure`.
        """
        from imgtune.explain.figures import plot_top_losses

        return plot_top_losses(self, k, cam=cam)

    def plot_cam(self, image, class_index: int | None = None):
        """A Figure of ``image`` as the model sees it and its Grad-CAM heatmap (see :meth:`grad_cam`).

        Args:
            image: a path, a PIL image, an array or a ``(3, H, W)`` model input.
            class_index: the class to explain (``None``: the predicted one).

        Returns:
            A :class:`matplotlib.figure.Figure`.
        """
        from imgtune.explain.figures import plot_cam

        return plot_cam(self, image, class_index)

    # --- where the model looks --------------------------------------------------------------------

    def grad_cam(self, image, class_index: int | None = None) -> np.ndarray:
        """Grad-CAM: where in ``image`` the evidence for a class lies.

        The activations A_k of the Grad-CAM layer (see :func:`imgtune.models.gradcam_layer`) are
        weighted by the spatial mean of the class score's gradient, ``relu(sum_k w_k A_k)``, upsampled
        bilinearly to the input size and scaled to [0, 1].

        The model is run in eval mode and each module's mode is restored afterwards; no hook stays
        behind, no parameter gets a ``.grad`` and no ``requires_grad`` flag changes.

        Args:
            image: a path, a PIL image, an HxWxC uint8 array, or an already transformed ``(3, H, W)`` tensor.
            class_index: the class to explain (default: the predicted class).

        Returns:
            An ``(H, W)`` float32 array in [0, 1] at the model's input size (``size`` x ``size``).
        """
        if self.model is None:
            raise ImgtuneError("this Interpretation has no model; build it with from_learner or from_run")
        layer = gradcam_layer(self.model, self.arch)
        return gradcam.grad_cam(self.model, layer, self.input_tensor(image), class_index, name=self.arch)

    def probabilities(self, image) -> np.ndarray:
        """The model's ``(C,)`` float32 class probabilities for one image (given as for :meth:`grad_cam`).

        The model runs in eval mode and each module's mode is restored afterwards.

        Args:
            image: a path, a PIL image, an array or a ``(3, H, W)`` model input.

        Returns:
            The ``(C,)`` probabilities, in the order of ``classes``.

        Raises:
            ImgtuneError: this Interpretation has no model.
        """
        if self.model is None:
            raise ImgtuneError("this Interpretation has no model; build it with from_learner or from_run")
        param = next(self.model.parameters(), None)
        x = self.input_tensor(image).unsqueeze(0).to(param.device if param is not None else "cpu")
        modes = {module: module.training for module in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                logits = self.model(x).float()
        finally:
            for module, training in modes.items():
                module.training = training
        return logits.softmax(1)[0].cpu().numpy()

    def overlay(self, image, heatmap: np.ndarray, alpha: float = 0.45, *, cmap: str = "jet") -> Image.Image:
        """``image`` as the model saw it (resized, cropped, de-normalised) with ``heatmap`` drawn over it.

        Args:
            image: as for :meth:`grad_cam`.
            heatmap: an ``(H, W)`` array in [0, 1], e.g. from :meth:`grad_cam`.
            alpha: the heatmap's weight in the blend (0 shows the image alone).
            cmap: a matplotlib colormap name.

        Returns:
            An RGB PIL image of the model's input size.
        """
        return gradcam.overlay(self.model_view(image), heatmap, alpha, cmap=cmap)

    def model_view(self, image) -> np.ndarray:
        """``image`` as the model sees it, de-normalised.

        Args:
            image: a path, a PIL image, an array or a ``(3, H, W)`` model input.

        Returns:
            An ``(H, W, 3)`` uint8 array.
        """
        x = self.input_tensor(image).detach().float().cpu()
        mean = torch.tensor(self.meta.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.meta.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
        pixels = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        return np.rint(pixels * 255).astype(np.uint8)

    def input_tensor(self, image) -> torch.Tensor:
        """A ``(3, H, W)`` model input from a path, a PIL image, an array or a ready tensor.

        Compute it once and pass it to :meth:`grad_cam`, :meth:`model_view` and :meth:`overlay` to
        decode and transform an image file only once.

        Args:
            image: a path, a PIL image, an ``(H, W, 3)`` array, or a ``(3, H, W)`` tensor (returned as is).

        Returns:
            The ``(3, H, W)`` float tensor.

        Raises:
            ImgtuneError: no transform to make one; ValueError, TypeError: an input of the wrong shape or type.
        """
        if isinstance(image, torch.Tensor):
            if image.dim() != 3:
                raise ValueError(f"give one (3, H, W) image tensor, not shape {tuple(image.shape)}")
            return image
        if self.transform is None:
            raise ImgtuneError("this Interpretation has no transform; pass a preprocessed (3, H, W) tensor")
        if isinstance(image, (str, Path)):
            image = load_image(image, min_size=self.meta.get("size"))
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"cannot read an image from {type(image).__name__}; give a path, a PIL image, "
                            "an array or a tensor")
        return self.transform(to_rgb(image))


def _model_of(predictor) -> dict:
    """The Grad-CAM settings of a loaded bundle (a torch ``Predictor``): model, transform, arch, meta."""
    meta = {k: predictor.meta[k] for k in ("size", "mean", "std")}
    meta["resize"] = predictor.meta.get("resize", "crop")
    return dict(model=predictor.model, transform=predictor.transform,
                arch=predictor.meta.get("arch") or predictor.meta["timm_name"], meta=meta)
