"""One training step (forward with labels, backward, AdamW step; every parameter trained as in stage III) of the
`compact` preset: ours (packed varlen attention over cu_seqlens, fused linear cross-entropy, fused projector and
patch embedding) vs transformers' LlavaForConditionalGeneration (attn_implementation="sdpa", logits + its loss)
with the same weights (our save_pretrained, loaded by transformers), the same 4 x 512-token batch (ours packed as
one (1, 2048) sequence with cu_seqlens, theirs as a (4, 512) batch: no padding either way) on CPU, fp32.
Twice: at the compact preset's own vocabulary and at InternLM2's 92544 entries, where the full logits that
transformers materialises dominate memory and the fused cross-entropy shows its cut.

Each variant runs in a fresh subprocess, the two alternating over GMAIVL_BENCH_ROUNDS rounds (default 3; ratios per
round, reported as ranges with the load average); peak memory is the resident-set high-water mark of the measured steps
above the resident set after a warm-up step (bench/measure.py), so weights,
gradients-to-be and AdamW state are in the baseline and the figure is what the step itself needs. Ratios (ours
over transformers' memory, transformers' over ours in time) go to extra_info; only the first-step losses are
asserted equal (same weights and batch, fp32: rtol 1e-4), never a timing."""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from measure import alternating_fresh_processes, load_average, peak_extra_mib, span

SEQS, SEQ_LEN, STEPS = 4, 512, 3

def build_step(variant: str, model_dir, seqs: int = SEQS, seq_len: int = SEQ_LEN):
    """A closure running one full training step of `variant` ("ours" | "transformers"); returns the loss."""
    from gmaivl_rt import GMAIVLConfig

    cfg = GMAIVLConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    n_img, image = cfg.num_image_tokens, cfg.vision.image_size
    ids = torch.randint(0, cfg.image_token_index, (seqs, seq_len))
    ids[:, 4:4 + n_img] = cfg.image_token_index
    labels = ids.clone()
    labels[:, :4 + n_img + 8] = -100  # prompt and image: no loss, as the dataset masks them
    pixels = torch.randn(seqs, 3, image, image)
    if variant == "ours":
        model = GMAIVL.from_pretrained(model_dir)
        cu = torch.arange(0, seqs * seq_len + 1, seq_len, dtype=torch.int32)
        pos = torch.arange(seq_len).repeat(seqs)[None]

        def loss_fn():
            return model(ids.reshape(1, -1), pixel_values=pixels, position_ids=pos, labels=labels.reshape(1, -1),
                         cu_seqlens=cu).loss
    else:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa",
                                                              dtype=torch.float32)

        def loss_fn():
            return model(input_ids=ids, pixel_values=pixels, labels=labels).loss
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())
    return step


def measure(variant: str, model_dir: str) -> dict:
    """Run in a fresh process (measure.in_fresh_process): a warm-up step (allocates AdamW state), then STEPS
    measured steps: median time, tokens/s and the extra peak memory above the warmed-up resident set."""
    step = build_step(variant, model_dir)
    first_loss = step()
    times, peak, method = peak_extra_mib(lambda: [_timed(step) for _ in range(STEPS)])
    seconds = statistics.median(times)
    return {"first_loss": first_loss, "seconds": seconds, "tokens_per_s": SEQS * SEQ_LEN / seconds,
            "peak_extra_mib": peak, "method": method}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


ROUNDS = int(os.environ.get("GMAIVL_BENCH_ROUNDS", "3"))


@pytest.mark.parametrize("vocab", [None, 92544], ids=["compact-vocab", "vocab-92544"])
def test_train_step_vs_transformers(benchmark, tmp_path, vocab):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set; this benchmark measures the CPU paths")
    config = GMAIVLConfig.preset("compact")
    if vocab is not None:
        config = config.replace(image_token_index=vocab - 1, text={"vocab_size": vocab})
    torch.manual_seed(0)
    GMAIVL(config).save_pretrained(tmp_path)
    load_before = load_average()
    # GMAIVL_BENCH_ROUNDS rounds, each side in its own fresh process, alternating: per-round same-run ratios
    runs = alternating_fresh_processes(__file__, "measure", {"ours": ("ours", tmp_path),
                                                             "transformers": ("transformers", tmp_path)}, ROUNDS)
    load_after = load_average()
    ours, theirs = runs["ours"], runs["transformers"]
    torch.testing.assert_close(ours[0]["first_loss"], theirs[0]["first_loss"], rtol=1e-4, atol=1e-4)
    speed = [o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs)]
    memory = [o["peak_extra_mib"] / t["peak_extra_mib"] for o, t in zip(ours, theirs)]

    # pytest-benchmark's own row: our training step timed in this process (the ratios come from the subprocesses).
    benchmark.pedantic(build_step("ours", tmp_path), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(
        batch=f"{SEQS} x {SEQ_LEN} tokens ({config.num_image_tokens} image tokens each), fp32, CPU",
        vocab_size=config.text.vocab_size,
        memory_method=ours[0]["method"],
        rounds=ROUNDS,
        ours_peak_extra_mib=[round(o["peak_extra_mib"], 1) for o in ours],
        transformers_peak_extra_mib=[round(t["peak_extra_mib"], 1) for t in theirs],
        peak_memory_ratio_ours_over_transformers=[round(m, 3) for m in memory],
        ours_tokens_per_s=[round(o["tokens_per_s"], 1) for o in ours],
        transformers_tokens_per_s=[round(t["tokens_per_s"], 1) for t in theirs],
        speedup_vs_transformers=[round(x, 3) for x in speed],
        first_step_loss=round(ours[0]["first_loss"], 5),
        load_average_before=load_before, load_average_after=load_after,
    )
    print(f"\ntrain step, vocab {config.text.vocab_size}, {ROUNDS} alternating rounds (load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after): ours "
          f"{span([o['tokens_per_s'] for o in ours], '{:.0f}')} tok/s, peak "
          f"+{span([o['peak_extra_mib'] for o in ours], '{:.0f}')} MiB | transformers "
          f"{span([t['tokens_per_s'] for t in theirs], '{:.0f}')} tok/s, peak "
          f"+{span([t['peak_extra_mib'] for t in theirs], '{:.0f}')} MiB | memory x{span(memory)}, speed x{span(speed)} "
          f"(same-round ratios)")
