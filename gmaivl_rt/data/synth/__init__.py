"""A generated medical VQA corpus with known ground truth (`gmaivl-rt data synth`).

scenes.py draws what each file shows from a closed, uniform label space; render.py turns a scene into a real DICOM
(CT, MR, CR/DX, US) or NIfTI file; questions.py asks about it in the benchmark forms; writer.py lays the corpus
out as source files plus a manifest that `data build` converts; benchmark.py writes held-out files of another seed
in the formats `gmaivl-rt eval` reads."""
from gmaivl_rt.data.synth.benchmark import constant_image_tsv, write_benchmark
from gmaivl_rt.data.synth.writer import SynthError, synthesize, task_subset

__all__ = ["synthesize", "task_subset", "write_benchmark", "constant_image_tsv", "SynthError"]
