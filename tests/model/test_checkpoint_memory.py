"""from_pretrained streams tensors into a meta-device model: its peak anonymous memory is the loaded model plus
about one checkpoint tensor, never a second full copy (what lets a 7B bf16 checkpoint load with ~15 GB free).
Measured in a fresh process by sampling RssAnon (file-backed mmap pages of the checkpoint are page cache the
kernel can drop, so they are not counted)."""
import json
import subprocess
import sys

from gmaivl_rt import GMAIVL, GMAIVLConfig

_PROBE = """
import json, sys, threading, time, torch
from gmaivl_rt import GMAIVL

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024

peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.0002)
base = anon()
sampler = threading.Thread(target=sample)
sampler.start()
model = GMAIVL.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
done.set()
sampler.join()
print(json.dumps({"peak_extra": peak[0] - base,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_loading_keeps_one_copy_in_memory(tmp_path):
    config = GMAIVLConfig.preset("compact").replace(
        text={"hidden_size": 512, "num_layers": 6, "intermediate_size": 1408, "num_heads": 8, "num_kv_heads": 4,
              "vocab_size": 32000}, image_token_index=31999)
    model = GMAIVL(config)
    model.save_pretrained(tmp_path)
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    largest_fp32_tensor = max(p.numel() * 4 for p in model.parameters())
    del model
    out = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["model_bytes"] == fp32_bytes // 2
    # the bf16 model + one fp32 tensor being converted + allocator slack; a state dict first would need > fp32_bytes
    budget = result["model_bytes"] + largest_fp32_tensor + 48 * 2**20
    assert result["peak_extra"] < budget < fp32_bytes + result["model_bytes"]


def test_saved_files_are_readable_like_any_new_file(tmp_path):
    GMAIVL(GMAIVLConfig.preset("tiny")).save_pretrained(tmp_path)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o044, f"{name} is private to its owner"
