"""`gmaivl-rt eval`: the paper's medical benchmarks (VLMEvalKit TSV, HuatuoGPT-Vision, SLAKE, VQA-RAD, PMC-VQA)
answered through any backend and scored as the public evaluation kits score them."""
from gmaivl_rt.eval.run import compare, evaluate, merge, score

__all__ = ["compare", "evaluate", "merge", "score"]
