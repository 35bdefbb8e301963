"""The grammar-engine comparison of docs/structured-output.md, by hand (not a test): compile time of the findings
schema, time to compute one token mask (on a bitmask, as each engine gives it), and which JSON-schema features
compile, for llguidance, xgrammar and outlines-core, whichever are importable. The tokenizer is a byte-level BPE
of VOCAB tokens (default 32000) trained here on the Python standard library's sources.

    python bench/grammar_engines.py [VOCAB]        # e.g. PYTHONPATH=DIR with xgrammar / outlines-core in DIR
"""
import glob, json, sys, time, os
from pathlib import Path
import torch
from gmaivl_rt.train.tokenizer import train_bpe_tokenizer
V = int(sys.argv[1]) if len(sys.argv) > 1 else 32000
out = f"/tmp/gmaivl_grammar_engines_tok{V}"
if not os.path.exists(out + "/tokenizer.json"):
    texts = [open(f, errors="ignore").read() for f in glob.glob("/usr/lib/python3*/**/*.py", recursive=True)[:3000]]
    train_bpe_tokenizer(texts, out, vocab_size=V, min_frequency=2)
from gmaivl_rt.runtime.tokenizer import load_tokenizer
tok = load_tokenizer(out)
print("vocab", len(tok))
schema = json.loads((Path(__file__).parents[1] / "examples" / "findings.schema.json").read_text())
features = {
 "enum+required+additionalProperties": schema,
 "pattern": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}, "required": ["id"]},
 "format date": {"type": "string", "format": "date"},
 "minItems/maxItems": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
 "anyOf": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]},
 "$ref/$defs": {"$defs": {"s": {"enum": ["left", "right"]}}, "type": "object", "properties": {"side": {"$ref": "#/$defs/s"}}, "required": ["side"]},
 "number min/max": {"type": "number", "minimum": 0.5, "maximum": 10},
 "minLength/maxLength": {"type": "string", "minLength": 2, "maxLength": 5},
 "const": {"const": "CT"},
 "recursive": {"$defs": {"n": {"type": "object", "properties": {"c": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}, "$ref": "#/$defs/n"},
}
res = {}
def bench_steps(name, make, fill, consume, sample_logits):
    t0 = time.perf_counter(); st = make(); t1 = time.perf_counter()
    n, tm = 0, 0.0
    g = torch.Generator().manual_seed(0)
    for i in range(200):
        ta = time.perf_counter(); allowed = fill(st); tm += time.perf_counter() - ta; n += 1
        if allowed is not None and allowed.dtype == torch.int32: allowed = ((allowed[:, None] >> torch.arange(32)) & 1).reshape(-1).bool()
        if allowed is None: break
        logits = torch.randn(len(tok) if True else V, generator=g)
        logits[~allowed[:logits.shape[0]]] = -float("inf")
        t = int(torch.multinomial(logits.softmax(-1), 1, generator=g)) if torch.isfinite(logits).any() else None
        if t is None or not consume(st, t): break
    return (t1 - t0) * 1e3, tm / max(n, 1) * 1e6, n

try:
    import llguidance, llguidance.hf, llguidance.torch
    lt = llguidance.hf.from_tokenizer(tok)
    cov = {}
    for k, s in features.items():
        g = llguidance.LLMatcher.grammar_from_json_schema(s)
        ok = not llguidance.LLMatcher.validate_grammar_with_warnings(g, lt)[0]
        cov[k] = ok
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    def make():
        return llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
    bm = llguidance.torch.allocate_token_bitmask(1, lt.vocab_size)
    def fill(m):
        if m.is_stopped(): return None
        llguidance.torch.fill_next_token_bitmask(m, bm, 0)
        return bm[0]
    res["llguidance"] = (bench_steps("llg", make, fill, lambda m, t: m.consume_token(t), None), cov)
except Exception as e:
    res["llguidance"] = repr(e)
try:
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    cov = {}
    for k, s in features.items():
        try:
            comp.compile_json_schema(json.dumps(s)); cov[k] = True
        except Exception as e:
            cov[k] = False
    bm = xgr.allocate_token_bitmask(1, info.vocab_size)
    def make():
        return xgr.GrammarMatcher(comp.compile_json_schema(json.dumps(schema)))
    def fill(m):
        if m.is_terminated(): return None
        m.fill_next_token_bitmask(bm)
        return bm[0]
    res["xgrammar"] = (bench_steps("xgr", make, fill, lambda m, t: m.accept_token(t), None), cov)
except Exception as e:
    import traceback; traceback.print_exc()
    res["xgrammar"] = repr(e)
try:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    dec = {}
    def bytes_to_unicode():
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]; n = 0
        for b in range(256):
            if b not in bs: bs.append(b); cs.append(256 + n); n += 1
        return dict(zip(bs, map(chr, cs)))
    b2u = {v: k for k, v in bytes_to_unicode().items()}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for t, i in tok.get_vocab().items():
        if t in tok.all_special_tokens: continue
        try:
            dec.setdefault(bytes(b2u[c] for c in t), []).append(i)
        except KeyError:
            pass
    vocab = Vocabulary(eos, dec)
    cov = {}
    for k, s in features.items():
        try:
            Index(build_regex_from_schema(json.dumps(s)), vocab); cov[k] = True
        except BaseException as e:
            cov[k] = False
    def make():
        return Guide(Index(build_regex_from_schema(json.dumps(schema)), vocab))
    def fill(g):
        if g.is_finished(): return None
        al = torch.zeros(len(tok), dtype=torch.bool); al[list(g.get_tokens())] = True; return al
    def consume(g, t):
        if t == eos: return False
        g.advance(t); return True
    res["outlines-core"] = (bench_steps("oc", make, fill, consume, None), cov)
except Exception as e:
    import traceback; traceback.print_exc()
    res["outlines-core"] = repr(e)
for k, v in res.items():
    print(k, v if isinstance(v, str) else f"compile {v[0][0]:.1f} ms, mask {v[0][1]:.1f} us/token over {v[0][2]} tokens; coverage {sum(v[1].values())}/{len(v[1])} missing {[f for f, ok in v[1].items() if not ok]}")
