"""Building deployment artefacts: ONNX graphs (`onnx_export`, `graphs`), transformers.js folders with weight-only
quantized variants (`transformers_js`, `quantize`) and the in-browser site (`web`), TensorRT engines
(`tensorrt_build`, `profiles`) and the TensorRT op inventory check (`op_inventory`). What runs them lives in `gmaivl_rt.runtime`
(`ort_backend`, `trt_backend`, `trt_plugin`). Imported as `gmaivl_rt.export`; modules load TensorRT, Triton and
onnxruntime only when used."""
if __name__ == "export":  # the checkout root is on sys.path: not ours by that name (gmaivl_rt/bare_names.py)
    from gmaivl_rt.bare_names import hand_over

    hand_over(__name__, __file__)
