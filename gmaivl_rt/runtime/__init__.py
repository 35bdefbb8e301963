"""Inference in one process: `backends.load` puts a model folder on a backend (`torch_backend`, or the graph
backends `ort_backend` / `trt_backend` over `graph_backend`'s shared loop, with `trt_plugin` for TensorRT's
attention and `deploy_format` naming an exported folder's files); every input crosses the request boundary
(`request`); `batching` builds padded batches; `tokenizer` loads a folder's tokenizer; `cli` is `gmaivl-rt ask`."""
