"""Using a trained model without the training code: the bundle, predictors (PyTorch, ONNX Runtime), ONNX export."""
