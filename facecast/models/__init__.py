"""The model tier: the embedded models' registry, the user's ONNX files, the choice of model
per engine, and the ONNX runtime they run on."""
