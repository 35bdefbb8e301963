"""The model layer: configuration (`config`), the GMAI-VL network read top to bottom (`modeling`), checkpoints
(`checkpoint`), the chat template and image preprocessing (`chat`), dynamic-resolution sizes (`vision_sizes`), the
decoding step and loop (`sampling`) and the one door to the kernels (`ops`). Imports only kernels and the base."""
