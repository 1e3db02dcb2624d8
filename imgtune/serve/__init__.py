"""The web demo: a phone-friendly page and a JSON API that classify uploads with a bundle (and show Grad-CAM)."""
