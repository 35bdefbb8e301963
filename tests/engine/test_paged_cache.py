"""PagedKVCache against a forward without a cache: prompts fed in pieces through scattered blocks (fresh prefill,
several tokens after a cached prefix, single decode tokens, and all three mixed in one forward) must give the
logits of one full forward of each sequence. BlockPool's reference counts, prefix cache and LRU eviction."""
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.engine.block_pool import BlockPool, block_contents, block_keys
from gmaivl_rt.engine.paged_cache import PagedKVCache, grouped_decode_attention
from gmaivl_rt.model import ops


def _full_logits(model, ids):
    return model(torch.tensor([ids])).logits[0]


@torch.no_grad()
def test_pieces_through_the_paged_cache_match_one_forward():
    config = GMAIVLConfig.preset("tiny")
    model = GMAIVL(config).eval()
    cache = PagedKVCache(config, num_blocks=24, block_size=4, dtype=torch.float32, device="cpu")
    cache.pool.allocate(3)  # blocks 0-2 held elsewhere: the sequences get later, interleaved blocks
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (19, 13, 10)]
    expected = [_full_logits(model, ids) for ids in seqs]
    tables, fed = [[], [], []], [0, 0, 0]

    def run(pieces):  # pieces: {sequence: number of new tokens}
        rows = list(pieces)
        for r in rows:
            need = cache.pool.blocks_for(fed[r] + pieces[r]) - len(tables[r])
            tables[r] += cache.pool.allocate(need)
        width = max(pieces.values())
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :pieces[r]] = torch.tensor(seqs[r][fed[r]:fed[r] + pieces[r]])
            mask[i, :pieces[r]] = 1
        cache.bind([tables[r] for r in rows], [fed[r] for r in rows])
        logits = model.last_logits(ids, None, mask, cache)
        for i, r in enumerate(rows):
            fed[r] += pieces[r]
            torch.testing.assert_close(logits[i], expected[r][fed[r] - 1], atol=1e-5, rtol=0)

    run({0: 6, 1: 5})              # fresh prompts (varlen attention)
    run({0: 7, 1: 1, 2: 4})        # after a prefix + a decode token + a fresh prompt, in one forward
    run({0: 1, 1: 1, 2: 1})        # decode tokens (the paged decode op)
    run({1: 6, 2: 5, 0: 5})        # more pieces after prefixes, across block boundaries
    assert fed == [19, 13, 10] and len(set(sum(tables, []))) == sum(len(t) for t in tables)


@torch.no_grad()
def test_grouped_decode_attention_equals_the_paged_reference():
    """The compiled CPU step's attention (grouped query heads, plain tensor ops) against the paged decode reference
    (each sequence's blocks gathered, scaled_dot_product_attention with its keys repeated per head): 4 query heads
    over 2 kv heads, tables in scrambled block order and wider than some rows need, every row but the widest
    leaving positions of its table unread (masked), fp32 and bf16. Mutants: no mask; query head h read against kv
    head h % 2 instead of h // 2 (the grouping): both fail."""
    g = torch.Generator().manual_seed(0)
    pool_k, pool_v = torch.randn(7, 4, 2, 16, generator=g), torch.randn(7, 4, 2, 16, generator=g)
    q = torch.randn(5, 4, 16, generator=g)
    tables = torch.tensor([[3, 0, 5], [6, 1, 2], [4, 4, 4], [2, 5, 0], [1, 3, 6]], dtype=torch.int32)
    seqlens = torch.tensor([1, 12, 4, 7, 10], dtype=torch.int32)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        got = grouped_decode_attention(q.to(dtype), pool_k.to(dtype), pool_v.to(dtype), tables, seqlens)
        expected = ops.paged_decode_attention_reference(q.to(dtype), pool_k.to(dtype), pool_v.to(dtype), tables,
                                                        seqlens)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_block_pool_references_prefix_cache_and_lru():
    pool = BlockPool(num_blocks=4, block_size=2)
    ids = [5, 6, 7, 8, 9]
    keys = block_keys(ids, 2)
    assert len(keys) == 2 and keys != block_keys([5, 6, 7, 9, 9], 2)[:2] and keys[0] == block_keys([5, 6, 1], 2)[0]
    # the image's content key is part of every block its tokens touch
    assert block_keys(ids, 2, [(1, 3)], ["a"])[:2] != block_keys(ids, 2, [(1, 3)], ["b"])[:2]
    assert block_keys(ids, 2, [(3, 4)], ["a"])[0] == keys[0]
    first = pool.allocate(3)
    for key, block in zip(keys, first):
        pool.register(key, block)
    pool.release(first)            # cached blocks stay (free to take, still found); the third is plain free
    assert pool.num_free == 4 and pool.num_used == 0 and pool.num_cached == 2
    hit = pool.lookup(keys)
    assert hit == first[:2] and pool.num_used == 2
    assert pool.allocate(3) is None          # only 2 left: nothing taken
    pool.release(hit)
    taken = pool.allocate(3)  # the never-used and the plain free block first, then the least recently used cached
    assert taken == [3, first[2], first[0]] and pool.num_cached == 1
    assert pool.lookup(keys) == []           # the chain is broken at its first block
    assert pool.peak_used == 3


def test_block_pool_finds_the_longest_shared_start_of_a_next_block_and_forgets_evicted_ones():
    """`longest_partial`: among the cached blocks after one parent, the one sharing the most leading tokens with
    a prompt's next block (full or partly filled blocks alike); image tokens match only for the same image at the
    same place in it; an evicted block is never offered. Mutant: eviction leaving the block in the parent's index
    (it is offered after being handed out), seen failing."""
    pool = BlockPool(num_blocks=3, block_size=4)
    ids = [1, 2, 3, 4, 5, 6, 7]
    keys = block_keys(ids, 4)
    first, second, third = pool.allocate(3)
    pool.register(keys[0], first, b"", block_contents(ids, 0, 4))
    pool.register(None, second, keys[0], block_contents(ids, 4, 7))  # partly filled: 3 of 4 tokens
    pool.register(None, third, keys[0], block_contents([1, 2, 3, 4, 5, 9], 4, 6))
    pool.release([first, second, third])
    assert pool.num_cached == 3
    assert pool.longest_partial(keys[0], (5, 6, 8, 8)) == (second, 2)
    assert pool.longest_partial(keys[0], (5, 9)) == (third, 2)
    assert pool.longest_partial(keys[0], (4,)) == (None, 0) and pool.longest_partial(b"x", (5,)) == (None, 0)
    spans, image = [(1, 3)], ["scan"]
    assert block_contents(ids, 0, 4, spans, image) == (1, ("scan", 0), ("scan", 1), 4)
    assert block_contents(ids, 0, 4, spans, image) != block_contents(ids, 0, 4, spans, ["other"])
    assert block_contents(ids, 2, 4, [(0, 3)], image) == (("scan", 2), 4)
    taken = pool.allocate(3)  # evicts all three, least recently used first
    assert sorted(taken) == sorted([first, second, third]) and pool.num_cached == 0
    assert pool.longest_partial(keys[0], (5, 6, 7)) == (None, 0) and pool.lookup(keys) == []


def test_a_recomputed_answer_holding_the_image_token_id_matches_decoding_it():
    """A preempted request is recomputed from its ids, which may hold a *generated* image-token id: only the
    prompt's image slots take image features, the generated id is embedded as a token, as when it was decoded.
    Mutant: slots taken from `ids == image_token_index` (the engine's old behaviour): an InputError or other logits."""
    torch.manual_seed(0)
    model = GMAIVL(GMAIVLConfig.preset("tiny")).eval()
    cfg = model.config
    n = cfg.vision.tokens_per_image()
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    prompt = torch.cat([torch.tensor([5, 6]), torch.full((n,), cfg.image_token_index), torch.tensor([7])])[None]
    with torch.no_grad():
        cache = model.new_cache(1, prompt.shape[1] + 2)
        model.last_logits(prompt, pixels, None, cache)
        decoded = model.last_logits(torch.tensor([[cfg.image_token_index]]), None, None, cache)
        ids = torch.cat([prompt, torch.tensor([[cfg.image_token_index]])], dim=1)
        slots = torch.zeros_like(ids, dtype=torch.bool)
        slots[0, 2:2 + n] = True
        recomputed = model.last_logits(ids, None, None, model.new_cache(1, ids.shape[1]),
                                        image_features=model.encode_images(pixels), image_slots=slots)
    torch.testing.assert_close(recomputed, decoded, rtol=1e-5, atol=1e-5)
