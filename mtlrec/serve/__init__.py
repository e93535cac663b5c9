"""Serving: score fusion, model export (TorchScript / ONNX) and an HTTP scoring service.

Nothing here is imported by the core package: FastAPI, uvicorn and onnxruntime are optional
(``pip install 'mtlrec[serve]'``) and only the modules that need them import them, lazily, so
``import mtlrec`` and training work without the serving extras installed.
"""
