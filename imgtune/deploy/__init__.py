"""Using a trained model: the bundle, predictors (PyTorch, ONNX Runtime), export, the web demo."""
