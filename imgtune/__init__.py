"""imgtune: fine-tune an ImageNet-pretrained network on a folder of labelled images, offline, on one machine."""

__version__ = "0.1.0"

from imgtune.callbacks import CheckpointCallback, EarlyStopping, History, ProgressCallback
from imgtune.data import PETS_LABEL_RE, ImageData, Item, load_data
from imgtune.datasets import CATALOGUE
from imgtune.doctor import diagnose
from imgtune.download import download_images
from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.export import Prediction, Predictor
from imgtune.images import load_image
from imgtune.interpret import Interpretation, TopLoss
from imgtune.learner import Learner, LRFinderResult, set_seed
from imgtune.mislabel import find_mislabels
from imgtune.models import REGISTRY, create_model
from imgtune.render import aggregate_windows, find_sessions, render_sessions

__all__ = [
    "CATALOGUE",
    "CheckpointCallback",
    "EarlyStopping",
    "History",
    "ImageData",
    "ImgtuneError",
    "Interpretation",
    "Item",
    "LRFinderResult",
    "Learner",
    "PETS_LABEL_RE",
    "Prediction",
    "Predictor",
    "ProgressCallback",
    "REGISTRY",
    "TopLoss",
    "UnreadableImageError",
    "__version__",
    "aggregate_windows",
    "create_model",
    "diagnose",
    "download_images",
    "find_mislabels",
    "find_sessions",
    "load_data",
    "load_image",
    "render_sessions",
    "set_seed",
]
