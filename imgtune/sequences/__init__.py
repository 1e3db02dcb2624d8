"""What is not a photo, drawn as one: mouse sessions and numeric time series rendered as images."""
