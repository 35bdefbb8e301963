"""One-shot GPU check (`python -m gmaivl_rt.gpu_check`, `make gpu-check`): what the CPU cannot prove about the
kernels and the serving engine's decode speed, in priority order within a time budget (see `run` for the checks and the output)."""
from gmaivl_rt.gpu_check.decode_checks import check_decode
from gmaivl_rt.gpu_check.kernel_checks import check_configs, check_determinism, check_scale, interpreter_key, offered_inputs
from gmaivl_rt.gpu_check.model_checks import check_model, check_throughput
from gmaivl_rt.gpu_check.recording import FULL, SMOKE, Recorder, Sizes, compare, relative_error
from gmaivl_rt.gpu_check.run import CHECKS, NO_GPU, main, record_no_gpu, run

__all__ = ["CHECKS", "NO_GPU", "check_decode", "record_no_gpu", "FULL", "SMOKE", "Recorder", "Sizes", "check_configs", "check_determinism", "check_model",
           "check_scale", "check_throughput", "compare", "interpreter_key", "main", "offered_inputs", "relative_error",
           "run"]
