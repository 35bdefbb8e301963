"""Deployment: ONNX graphs (`onnx_export`, `graphs`), the ONNX Runtime backend (`ort_backend`), TensorRT engines
(`tensorrt_build`, `profiles`, `trt_plugin`, `trt_backend`) and the TensorRT op inventory check (`op_inventory`).
Modules are imported on use: TensorRT, Triton and onnxruntime load only where they are needed."""
