"""Served = evaluated: a model folder whose generation_config.json holds GMAI-VL's recommended settings (penalties
included, as the trainer writes it), scored by `gmaivl-rt eval` and served by `gmaivl-rt serve` (the CLI's own app,
run on a free 127.0.0.1 port in this process), gives the same answer item by item when the official `openai` client
sends the same prompts and the decoding fields run.json records. A second check sends the prompt VLMEvalKit's API
models build (and its JPEG, upscaled image) and finds the served answers equal to `ask` on the same inputs."""
from __future__ import annotations

import base64
import io
import json
import shutil

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from gmaivl_rt.cli import main  # noqa: E402
from gmaivl_rt.eval.prompts import item_text  # noqa: E402
from gmaivl_rt.eval.readers import read_benchmark  # noqa: E402
from gmaivl_rt.runtime.generation_config import RECOMMENDED_GENERATION, write_generation_config  # noqa: E402

MODEL = "served-colour"


@pytest.fixture(scope="module")
def model_folder(colour_model_dir, tmp_path_factory):
    """The colour model with the recommended decoding defaults, as a trained folder has them."""
    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(colour_model_dir, folder)
    write_generation_config(folder)
    return folder


def serve(folder, monkeypatch, work, *flags):
    """`gmaivl-rt serve FOLDER FLAGS`, with the server's run replaced by a BackgroundServer on a free loopback port
    (bounded start and stop) that runs `work(client)` and stops. Returns what `work` returned."""
    from gmaivl_rt.server import hosting
    from gmaivl_rt.server.background import BackgroundServer

    done = []

    def run(config):
        app, host = config.app, config.host
        assert host == "127.0.0.1"
        with BackgroundServer(app, host=host) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", timeout=120, max_retries=0)
            done.append(work(client))

    monkeypatch.setattr(hosting, "serve_until_stopped", run)
    assert main(["serve", str(folder), "--served-model-name", MODEL, "--max-batch-size", "4", *flags]) == 0
    return done[0]


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def served_answer(client, text: str, image_uri: str, decoding: dict, **image_fields) -> str:
    """One question as an OpenAI chat request: the image part, then the text, with the decoding run.json records
    sent as the fields a vLLM client sends (temperature 0 = greedy; vLLM's sampling fields in extra_body)."""
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_uri, **image_fields}},
            {"type": "text", "text": text}]}],
        max_tokens=decoding["max_new_tokens"], temperature=0 if not decoding["do_sample"] else decoding["temperature"],
        top_p=decoding["top_p"], extra_body={"top_k": decoding["top_k"],
                                             "repetition_penalty": decoding["repetition_penalty"],
                                             "no_repeat_ngram_size": decoding["no_repeat_ngram_size"]})
    return reply.choices[0].message.content


def test_served_answers_equal_the_evaluated_ones(model_folder, colour_bench_file, tmp_path, monkeypatch):
    """Mutants: the client leaving the penalty fields out (the server's defaults then add the folder's penalties and
    some answer changes: checked below), the server not honouring repetition_penalty."""
    out = tmp_path / "eval"
    assert main(["eval", str(model_folder), "--data", str(colour_bench_file), "--out", str(out), "--batch-size", "4",
                 "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    decoding = run["decoding"]
    assert not decoding["do_sample"] and decoding["repetition_penalty"] == 1.0  # the protocol's plain greedy
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    items = {item.index: item for item in read_benchmark(colour_bench_file).items}

    def ask_all(client, fields):
        answers = []
        for line in predictions:
            item = items[line["index"]]
            png = base64.b64decode(item.images[0].data)
            answers.append(served_answer(client, item_text(item), data_uri(png, "image/png"), fields))
        return answers

    served, with_defaults = serve(model_folder, monkeypatch, lambda client: (
        ask_all(client, decoding),
        ask_all(client, {**decoding, **{k: RECOMMENDED_GENERATION[k]
                                        for k in ("repetition_penalty", "no_repeat_ngram_size")}})))
    assert served == [line["prediction"] for line in predictions]
    assert len(served) == 8 and all(served)
    # the penalties of the folder's defaults change some answer: the fields the client sends are what decide
    assert with_defaults != served


def vlmevalkit_api_prompt(item) -> str:
    """The text VLMEvalKit's ImageMCQDataset.build_prompt gives an API model (GPT4V / --base-url): hint, question,
    options, then its instruction, each line ended by a newline."""
    prompt = f"Hint: {item.hint}\n" if item.hint else ""
    prompt += f"Question: {item.question}\n"
    if item.options:
        prompt += "Options:\n" + "".join(f"{letter}. {option}\n" for letter, option in item.options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def vlmevalkit_jpeg(png: bytes, min_edge: int = 100) -> bytes:
    """The image as VLMEvalKit's encode_image_to_base64 sends it: re-encoded as JPEG, and upscaled by one factor
    until its shorter side is at least `min_edge` (VLMEVAL_MIN_IMAGE_EDGE, default 100)."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    if min(image.size) < min_edge:
        factor = min_edge / min(image.size)
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_kit_built_prompt_is_served_as_ask_answers_it(model_folder, colour_bench_file, monkeypatch):
    """VLMEvalKit's API-model prompt and JPEG image (`detail` set, as its GPT4V wrapper sends it) through the
    server equal `ask` on the same text and bytes with the same decoding, item by item."""
    import gmaivl_rt

    decoding = {"max_new_tokens": 5, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    items = read_benchmark(colour_bench_file).items
    inputs = [(vlmevalkit_api_prompt(item), vlmevalkit_jpeg(base64.b64decode(item.images[0].data)))
              for item in items]
    assert inputs[1][0].startswith("Hint: Look at the whole image.\nQuestion: Which colour is the image?\n"
                                   "Options:\nA. ")
    assert min(Image.open(io.BytesIO(inputs[0][1])).size) >= 100
    served = serve(model_folder, monkeypatch, lambda client: [
        served_answer(client, text, data_uri(jpeg, "image/jpeg"), decoding, detail="low") for text, jpeg in inputs])
    runtime = gmaivl_rt.load(model_folder)
    assert served == [runtime.ask(text, jpeg, **decoding) for text, jpeg in inputs]
    assert all(served)
