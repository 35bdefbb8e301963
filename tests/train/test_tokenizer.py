"""The byte-level BPE for our presets: loads with transformers' AutoTokenizer, special tokens are single ids,
any text round-trips (byte level), and its chat template renders exactly what gmaivl_rt.model.chat.build_prompt does;
`gmaivl-rt tokenizer` says what vocabulary size it reached."""
import json

import pytest
from train_fixtures import make_dataset
from transformers import AutoTokenizer

from gmaivl_rt.cli import main as cli_main
from gmaivl_rt.model.chat import build_prompt
from gmaivl_rt.runtime.tokenizer import model_vocab_fields
from gmaivl_rt.train.tokenizer import SPECIAL_TOKENS, conversation_texts, train_bpe_tokenizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(conversation_texts(root), out, vocab_size=300, min_frequency=1)
    return root, out


def test_loads_with_autotokenizer_and_keeps_special_tokens_whole(trained):
    _, out = trained
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tok = AutoTokenizer.from_pretrained(str(out))
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == i
    ids = tok("<|im_start|>user\n<image><image>\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 2
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"
    assert len(tok) <= 300


def test_byte_level_round_trip_of_unseen_text(trained):
    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    text = "Größe 5 mm — 肺结节, ratio 0.75 (T2w)\n\ttabs"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_template_matches_build_prompt(trained):
    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    messages = [{"role": "user", "content": "<image>\nWhat is shown?"}, {"role": "assistant", "content": "A CT."},
                {"role": "user", "content": "Which plane?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == build_prompt(messages)


def test_merges_learned_from_the_data(trained):
    root, out = trained
    tok = AutoTokenizer.from_pretrained(str(out))
    # A word frequent in the data becomes fewer tokens than its bytes.
    assert len(tok("region", add_special_tokens=False)["input_ids"]) < len("region")
    texts = list(conversation_texts(root))
    assert any("<image>" in t for t in texts)


def test_model_vocab_fields_and_bad_size(trained, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(trained[1]))
    fields = model_vocab_fields(tok)
    assert fields == {"text": {"vocab_size": len(tok)}, "image_token_index": SPECIAL_TOKENS.index("<image>")}
    with pytest.raises(ValueError, match="vocab_size=100 must exceed"):
        train_bpe_tokenizer(["a b c"], tmp_path, vocab_size=100)
    config = json.loads((trained[1] / "tokenizer_config.json").read_text())
    assert "chat_template" in config or (trained[1] / "chat_template.jinja").is_file()


def test_model_and_tokenizer_that_disagree_are_refused(trained):
    from gmaivl_rt import GMAIVLConfig
    from gmaivl_rt.runtime.tokenizer import check_tokenizer_fits

    tokenizer = AutoTokenizer.from_pretrained(trained[1])
    fits = GMAIVLConfig.preset("tiny").replace(**model_vocab_fields(tokenizer))
    check_tokenizer_fits(fits, tokenizer, "tok/")
    with pytest.raises(ValueError, match=r"tokenizer tok/: <image> is id 6 but the model's image_token_index is 7"):
        check_tokenizer_fits(fits.replace(image_token_index=7), tokenizer, "tok/")
    with pytest.raises(ValueError, match="more than the model's vocab_size 100"):
        check_tokenizer_fits(fits.replace(text={"vocab_size": 100}), tokenizer, "tok/")


def test_tokenizer_reports_the_size_it_reached_and_why(tmp_path, capsys, caplog):
    """A small dataset cannot fill 2048 tokens: the CLI prints the size reached (as tokenizer.json holds it),
    the size asked for, and why; a size the text can reach gives no note."""
    data = make_dataset(tmp_path / "data", records_per_source=(6, 4))
    assert cli_main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "tok"), "--vocab-size", "2048"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    reached = len(saved["model"]["vocab"])
    assert printed["vocab_size"] == reached < 2048 and printed["requested_vocab_size"] == 2048
    assert f"reached {reached} tokens, not the 2048 asked for" in printed["note"]
    assert "min-frequency" in printed["note"]
    assert any("reached" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert cli_main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "tok2"), "--vocab-size", "280"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vocab_size"] == 280 and "note" not in printed
