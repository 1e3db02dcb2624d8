"""What the model gets wrong and where it looks: interpretation, Grad-CAM, figures, the run report."""
