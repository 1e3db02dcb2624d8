"""imgtune: fine-tune an ImageNet-pretrained network on a folder of labelled images, offline, on one machine."""

__version__ = "0.1.0"

from imgtune.train.callbacks import CheckpointCallback, EarlyStopping, History, ProgressCallback
from imgtune.data.sources import PETS_LABEL_RE, Item
from imgtune.data.loaders import ImageData, load_data
from imgtune.data.catalogue import CATALOGUE
from imgtune.curate.doctor import diagnose
from imgtune.curate.download import download_images
from imgtune.errors import ImgtuneError, UnreadableImageError
from imgtune.deploy.predict import Prediction, Predictor
from imgtune.data.images import load_image
from imgtune.explain.interpret import Interpretation, TopLoss
from imgtune.train.learner import Learner, LRFinderResult, set_seed
from imgtune.curate.mislabel import find_mislabels
from imgtune.models import REGISTRY, create_model
from imgtune.sequences.render import aggregate_windows, find_sessions, render_sessions

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
